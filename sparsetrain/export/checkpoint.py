"""Export from a Lightning checkpoint of an N:M run (plain torch: the checkpoint is a dict).

The checkpoint's exact N:M view is :func:`sparsetrain.nm.nm_export_checkpoint`'s (the masks the
``NMSparsity`` callback saved, the dense weights of its layers); its N:M layers are the 2:4
targets. A recipe's LightningModule holds its network as ``self.model``, so keys start with
``model.``; that prefix is dropped by default, and the export loads into the plain network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..nm.export import nm_export_checkpoint
from .save import ExportSummary, save_24

__all__ = ["AUTO_PREFIX", "auto_prefix", "read_checkpoint", "save_24_checkpoint"]

#: The attribute under which the recipe runner's LightningModules hold their network.
AUTO_PREFIX = "model."


def auto_prefix(keys: Any) -> str:
    """``"model."`` when every key starts with it (a recipe's LightningModule), else ``""``."""
    keys = list(keys)
    return AUTO_PREFIX if keys and all(k.startswith(AUTO_PREFIX) for k in keys) else ""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU (no pickled code runs).

    Raises:
        ValueError: the file is missing or cannot be read as a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`checkpoint` {str(path)!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file that is no (safe) checkpoint: say which
        raise ValueError(f"`checkpoint` {str(path)!r} cannot be read as a checkpoint "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"`checkpoint` {str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _nm_layers(checkpoint: Mapping[str, Any]) -> list[str]:
    return [layer for k, st in (checkpoint.get("callbacks") or {}).items()
            if isinstance(k, str) and k.startswith("NMSparsity") and isinstance(st, Mapping)
            for layer in st.get("layers", [])]


def save_24_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], dirpath: str | os.PathLike, *,
                       prefix: str | None = None, **kwargs: Any) -> ExportSummary:
    """:func:`~sparsetrain.export.save_24` of a Lightning checkpoint written with ``NMSparsity``.

    Args:
        checkpoint: the checkpoint file (read with ``torch.load(weights_only=True)``) or the loaded dict.
        dirpath: the export directory.
        prefix: keep the keys under it, without it; None: ``"model."`` when every key has it.
        **kwargs: :func:`~sparsetrain.export.save_24`'s (``targets`` defaults to the N:M layers).

    Raises:
        TypeError: ``checkpoint`` is neither a path nor a dict.
        ValueError: the file is missing or no checkpoint, or it holds no ``NMSparsity`` state
            and no ``targets`` are given.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"`checkpoint` must be a path or a checkpoint dict, got {type(checkpoint).__name__}")
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError("`checkpoint` holds no `state_dict` (is it a Lightning checkpoint?)")
    layers = _nm_layers(checkpoint)
    if layers:
        state = nm_export_checkpoint(checkpoint)
    elif kwargs.get("targets") is None and kwargs.get("masks") is None:
        raise ValueError("`checkpoint` holds no NMSparsity callback state; name the 2:4 layers with `targets`")
    else:
        state = dict(checkpoint["state_dict"])
    if prefix is None:
        prefix = auto_prefix(state)
    if layers and kwargs.get("targets") is None:
        kwargs["targets"] = [layer[len(prefix):] if layer.startswith(prefix) else layer for layer in layers]
    return save_24(state, dirpath, prefix=prefix, **kwargs)
