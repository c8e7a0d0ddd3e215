"""``config.json`` of a 2:4 export: what it records, and the checks on reading it back.

Written last, so a directory with a ``config.json`` holds a complete export::

    {
      "format": "sparsetrain-24", "version": 1,
      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                          "targets": [layers stored 2:4], "ignore": [layers stored dense],
                          "global_sparsity": zeros / entries of every floating tensor},
      "dtype": "bfloat16",            # of the 2:4 weights ("mixed" when they differ)
      "model_class": "pkg.Model",     # or null
      "recipe": {...},                # or null
      "keys": [the plain state dict's keys, in order],
      "files": ["model.safetensors"],
      "tensors": {"<stored name>": {"file", "dtype", "shape", "sha256"}}
    }

``sparsity_config`` is compressed-tensors' (``SparsityCompressionConfig``) for the
``sparse-24-bitmask`` format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "dtype_name", "parse_dtype", "read_config"]

CONFIG_NAME = "config.json"
FORMAT = "sparsetrain-24"
#: The export format version this code writes and the newest it reads.
FORMAT_VERSION = 1
SPARSITY_FORMAT = "sparse-24-bitmask"
STRUCTURE = "2:4"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: Any, what: str) -> torch.dtype:
    """The torch dtype a config names (``"bfloat16"``).

    Raises:
        ValueError: naming ``what`` and the value.
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: unknown dtype {name!r}")
    return dtype


def read_config(dirpath: Path) -> dict[str, Any]:
    """The export's ``config.json``, checked for its format and version.

    A ``config.json`` without sparsetrain's ``tensors`` table (one written by another tool) is
    returned as it is when it carries a ``sparse-24-bitmask`` ``sparsity_config`` (at the top or
    under ``quantization_config`` / ``compression_config``); there is no checksum to verify then.

    Raises:
        ValueError: no or unreadable ``config.json``, a format version newer than this code reads
            (or not a positive integer), or no ``sparse-24-bitmask`` sparsity config.
    """
    path = dirpath / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{dirpath} holds no {CONFIG_NAME}: not a 2:4 export (or an unfinished one)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if "tensors" in config:
        version = config.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{path}: `version` must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} is export format version {version}, newer than this sparsetrain reads "
                             f"(up to {FORMAT_VERSION}): upgrade sparsetrain to load it")
        if config.get("format") != FORMAT or not isinstance(config["tensors"], dict):
            raise ValueError(f"{path}: `format` must be {FORMAT!r} with a `tensors` table, got "
                             f"{config.get('format')!r}")
    sparsity = sparsity_config(config)
    if sparsity is None or sparsity.get("format") != SPARSITY_FORMAT:
        raise ValueError(f"{path} has no {SPARSITY_FORMAT!r} sparsity_config (got "
                         f"{None if sparsity is None else sparsity.get('format')!r})")
    return config


def sparsity_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The compressed-tensors sparsity config, wherever the file puts it."""
    for holder in (config, config.get("quantization_config"), config.get("compression_config")):
        if isinstance(holder, dict) and isinstance(holder.get("sparsity_config"), dict):
            return holder["sparsity_config"]
    return None
