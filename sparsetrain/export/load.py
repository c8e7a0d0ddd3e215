"""``load_24``: read a 2:4 export back, verified, as dense weights (or a model for the GPU runtime).

Every check runs before a tensor is used, and each failure is a ``ValueError`` naming the tensor:
the format version (a newer one is refused), every file present and as long as its header says
(truncation), every tensor ``config.json`` lists present with its dtype and shape, its SHA-256,
then for each 2:4 weight the consistency of ``.shape`` / ``.compressed`` / ``.bitmask``, at most 2
kept entries per group of 4 and finite values. Files are read with ``safetensors`` (no pickle).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files as _files
from .config import dtype_name, read_config, sparsity_config
from .layout import decompress_24

__all__ = ["load_24"]

_PARTS = ("compressed", "bitmask", "shape")


def _role(name: str) -> str:
    layer, _, part = name.rpartition(".")
    if part == "bitmask":
        return f"the 2:4 bitmask of layer {layer!r}"
    if part == "compressed":
        return f"the kept 2:4 values of layer {layer!r}"
    if part == "shape":
        return f"the dense shape of layer {layer!r}"
    return "a dense tensor"


def _file_list(dirpath: Path, config: dict[str, Any]) -> list[str]:
    if "files" in config:
        names = config["files"]
        if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
            raise ValueError(f"config.json: `files` must be a list of file names, got {names!r}")
        return names
    index = dirpath / _files.INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in dirpath.glob("*.safetensors"))


def _read_state(dirpath: Path) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    config = read_config(dirpath)
    ours = "tensors" in config
    if not ours:
        warnings.warn(f"{dirpath}: config.json records no checksums (written by another tool); the tensors are "
                      "checked for shape and the 2:4 pattern only", stacklevel=3)
    listed: dict[str, dict[str, Any]] = config.get("tensors", {})
    stored: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for name in _file_list(dirpath, config):
        path = dirpath / name
        if not path.is_file():
            held = [t for t, info in listed.items() if info.get("file") == name]
            raise ValueError(f"missing file {name} in {dirpath}" + (f" (it holds tensor {held[0]!r})" if held else ""))
        header, start = _files.read_header(path)
        for tname, info in header.items():
            if tname in stored:
                raise ValueError(f"tensor {tname!r} is stored twice ({stored[tname][0].name} and {name})")
            stored[tname] = (path, info, start)
    if not stored and not listed:
        raise ValueError(f"{dirpath} holds no safetensors file")

    # ------------------------------------------------------------------ every tensor present, as recorded
    for tname, rec in listed.items():
        if tname not in stored:
            raise ValueError(f"tensor {tname!r} ({_role(tname)}) listed in config.json is missing from "
                             f"{rec.get('file', 'the files')}")
        path, info, start = stored[tname]
        if rec.get("file") != path.name:
            raise ValueError(f"tensor {tname!r} is in {path.name}, config.json says {rec.get('file')}")
        got_dtype = _files.CODES.get(info.get("dtype"))
        if got_dtype is None or dtype_name(got_dtype) != rec.get("dtype"):
            raise ValueError(f"tensor {tname!r} ({_role(tname)}) is stored as {info.get('dtype')}, config.json "
                             f"records {rec.get('dtype')}")
        if list(info.get("shape", [])) != list(rec.get("shape", [])):
            raise ValueError(f"tensor {tname!r} ({_role(tname)}) has shape {info.get('shape')} in {path.name}, "
                             f"config.json records {rec.get('shape')}")
    if ours:
        extra = sorted(set(stored) - set(listed))
        if extra:
            raise ValueError(f"tensor {extra[0]!r} in {stored[extra[0]][0].name} is not listed in config.json")
        for tname, rec in listed.items():
            path, info, start = stored[tname]
            b, e = (int(v) for v in info["data_offsets"])
            if _files.sha256_range(path, start + b, start + e) != rec.get("sha256"):
                raise ValueError(f"checksum mismatch: tensor {tname!r} ({_role(tname)}) in {path.name} does not "
                                 "match its SHA-256 in config.json: the file was modified or corrupted")

    # ------------------------------------------------------------------ the plain state dict
    sparsity = sparsity_config(config) or {}
    if ours:
        keys = config.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("config.json: `keys` must be a list of state-dict keys")
        sparse_layers = set(sparsity.get("targets", []))
    else:
        sparse_layers = {n.rpartition(".")[0] for n in stored if n.endswith(".compressed")}
        keys, seen = [], set()
        for n in stored:
            layer, _, part = n.rpartition(".")
            key = f"{layer}.weight" if layer in sparse_layers and part in _PARTS else n
            if key not in seen:
                seen.add(key)
                keys.append(key)
    want_dtype = config.get("dtype")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def tensor(tname: str) -> torch.Tensor:
            if tname not in stored:
                raise ValueError(f"tensor {tname!r} ({_role(tname)}) is missing from the files")
            path = stored[tname][0]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            return handles[path].get_tensor(tname)

        for key in keys:
            layer = key[: -len(".weight")] if key.endswith(".weight") else None
            if layer is None or layer not in sparse_layers:
                out[key] = tensor(key)
                continue
            shape_t = tensor(f"{layer}.shape")
            if shape_t.dtype != torch.int64 or shape_t.numel() != 2:
                raise ValueError(f"tensor {layer + '.shape'!r} must hold 2 int64 values [rows, cols], got "
                                 f"{shape_t.dtype} of shape {tuple(shape_t.shape)}")
            rows, cols = (int(v) for v in shape_t.reshape(-1))
            compressed = tensor(f"{layer}.compressed")
            if ours and want_dtype not in (None, "mixed") and dtype_name(compressed.dtype) != want_dtype:
                raise ValueError(f"tensor {layer + '.compressed'!r} is {dtype_name(compressed.dtype)}, but config.json "
                                 f"says the 2:4 weights are {want_dtype}")
            if compressed.is_floating_point() and not bool(torch.isfinite(compressed).all()):
                raise ValueError(f"tensor {layer + '.compressed'!r} holds NaN or inf")
            out[key] = decompress_24(compressed, tensor(f"{layer}.bitmask"), (rows, cols), name=layer)
    return out, config


def load_24(dirpath_or_model: str | os.PathLike | nn.Module, dirpath: str | os.PathLike | None = None, *,
            device: str | torch.device | None = None, backend: str = "auto",
            strict: bool = True) -> OrderedDict[str, torch.Tensor] | nn.Module:
    """Load a 2:4 export written by :func:`~sparsetrain.export.save_24` (or compressed-tensors'
    ``Sparse24BitMaskCompressor``), verified tensor by tensor.

    ``load_24(dirpath)`` returns the dense state dict on the CPU: every 2:4 weight decompressed,
    bit-identical to the exact N:M view that was exported. ``load_24(model, dirpath)`` loads it
    into ``model`` (``load_state_dict``, which casts to the model's dtypes) and returns the model;
    with a CUDA ``device`` the model is moved there and handed to the GPU runtime,
    ``sparsetrain.runtime.sparsify_model(model, backend=backend)``, whose result is returned.

    Args:
        dirpath_or_model: the export directory, or the model to load into (then ``dirpath``).
        dirpath: the export directory when a model is given first.
        device: None or ``"cpu"``: the CPU; a CUDA device (needs a model): the 2:4 runtime.
        backend: passed to the runtime (CUDA only).
        strict: the model's state-dict keys must match the export's exactly.

    Returns:
        The state dict, or the loaded model.

    Raises:
        TypeError: arguments of the wrong type (named).
        ValueError: a corrupt, truncated or mismatched export (naming the tensor and what is
            wrong), a newer format version, a device that is neither CPU nor CUDA, a CUDA device
            without a model, or an export that does not fit ``model`` (naming the key).
        RuntimeError: a CUDA device, and the 2:4 runtime cannot be imported.

    Example::

        >>> import tempfile, torch
        >>> from sparsetrain.export import save_24
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1., 0, 2, 0] * 2, [0, 3, 0, 4] * 2]))
        >>> path = tempfile.mkdtemp()
        >>> _ = save_24(model, path)
        >>> torch.equal(load_24(path)["0.weight"], model[0].weight)
        True
    """
    model = None
    if isinstance(dirpath_or_model, nn.Module):
        model = dirpath_or_model
        if dirpath is None:
            raise TypeError("load_24(model, dirpath): `dirpath` is required when a model is given")
    else:
        if dirpath is not None:
            raise TypeError("pass load_24(dirpath) or load_24(model, dirpath), got two paths")
        dirpath = dirpath_or_model
    if not isinstance(dirpath, (str, os.PathLike)):
        raise TypeError(f"`dirpath` must be a path, got {type(dirpath).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a string, got {backend!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be True or False, got {strict!r}")
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"`device` must be None, 'cpu' or a CUDA device, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"`device` must be None, 'cpu' or a CUDA device, got {device!r}")
    if dev.type == "cuda" and model is None:
        raise ValueError("`device` CUDA needs the model: load_24(model, dirpath, device='cuda') builds the 2:4 "
                         "runtime's layers on it; load_24(dirpath) returns dense CPU weights")
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        raise ValueError(f"`dirpath` {str(dirpath)!r} is not a directory")
    state, _ = _read_state(dirpath)
    if model is None:
        return state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        what = (f"the model has {missing[0]!r}, which the export lacks" if missing else
                f"the export has {unexpected[0]!r}, which the model lacks")
        raise ValueError(f"the export in {dirpath} does not fit {type(model).__name__}: {what} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"the export's {k!r} has shape {tuple(v.shape)}, the model's {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=strict)
    if dev.type == "cpu":
        return model
    try:
        from sparsetrain.runtime import sparsify_model
    except ImportError as err:
        raise RuntimeError(f"load_24(device={str(dev)!r}) hands the model to the 2:4 GPU runtime "
                           f"(sparsetrain.runtime.sparsify_model), which cannot be imported: {err}") from err
    return sparsify_model(model.to(dev), backend=backend)
