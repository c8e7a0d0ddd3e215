"""``save_24``: write a model's (or a state dict's) 2:4 weights in the ``sparse-24-bitmask`` layout.

Each target weight that is exactly 2:4 becomes ``<layer>.compressed`` / ``.bitmask`` / ``.shape``
(:mod:`sparsetrain.export.layout`); every other tensor is stored dense. The files are
safetensors, written tensor by tensor (:mod:`sparsetrain.export.files`) and split into shards of
at most ``max_shard_bytes`` with a ``model.safetensors.index.json``, and ``config.json``
(:mod:`sparsetrain.export.config`) records the sparsity config and a SHA-256 per tensor.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import contract
from . import files as _files
from .config import CONFIG_NAME, FORMAT, FORMAT_VERSION, SPARSITY_FORMAT, STRUCTURE, dtype_name
from .layout import check_24, compress_24
from .view import ExportView, export_view

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ExportSummary", "check_dtype", "check_globs", "save_24"]

#: Hugging Face's default shard size.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`save_24` wrote.

    Attributes:
        path: the export directory.
        files: the safetensors files (and the index, when sharded), relative to ``path``.
        targets: layers stored 2:4.
        dense_layers: target layers stored dense (``ignore``, or a shape that cannot take 2:4).
        sparse_bytes: bytes of the 2:4 layers' stored tensors (values, bitmasks, shapes).
        sparse_dense_bytes: bytes the same weights take dense, in the exported dtype.
        total_bytes: bytes of every stored tensor.
        dense_total_bytes: bytes of every tensor dense, in the exported dtype.
        file_bytes: size of the directory's files (safetensors headers and ``config.json`` included).
        global_sparsity: fraction of zeros among the entries of every floating tensor.
    """

    path: Path
    files: tuple[str, ...]
    targets: tuple[str, ...]
    dense_layers: tuple[str, ...]
    sparse_bytes: int
    sparse_dense_bytes: int
    total_bytes: int
    dense_total_bytes: int
    file_bytes: int
    global_sparsity: float

    def lines(self, checkpoint_bytes: int | None = None) -> list[str]:
        """A short report: the 2:4 layers' and the whole model's bytes against their dense size
        (and against a checkpoint file's size, when given)."""
        def mb(n: int) -> str:
            return f"{n / 1e6:.3f} MB"

        def ratio(a: int, b: int) -> str:
            return f"{a / b:.3f}x" if b else "n/a"

        out = [f"2:4 layers ({len(self.targets)}): {mb(self.sparse_bytes)} against {mb(self.sparse_dense_bytes)} "
               f"dense ({ratio(self.sparse_bytes, self.sparse_dense_bytes)})",
               f"whole model: {mb(self.total_bytes)} against {mb(self.dense_total_bytes)} dense "
               f"({ratio(self.total_bytes, self.dense_total_bytes)}); files {mb(self.file_bytes)}"
               f", global sparsity {self.global_sparsity:.3f}"]
        if checkpoint_bytes is not None:
            out.append(f"the dense checkpoint file: {mb(checkpoint_bytes)} (export files "
                       f"{ratio(self.file_bytes, checkpoint_bytes)} of it)")
        if self.dense_layers:
            out.append(f"stored dense: {', '.join(self.dense_layers)}")
        return out


def check_globs(value: Any, arg: str) -> tuple[str, ...]:
    """``value`` as a tuple of non-empty strings (layer-name globs); TypeError naming ``arg`` otherwise."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"`{arg}` must be a list of layer-name globs, got {value!r}")
    value = tuple(value)
    bad = next((v for v in value if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise TypeError(f"`{arg}` entries must be non-empty strings, got {bad!r}")
    return value


def check_dtype(dtype: Any) -> torch.dtype | None:
    """None, or the export dtype (``torch.float32`` / ``float16`` / ``bfloat16``, or its name)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in _FLOATS:
        raise ValueError(f"`dtype` must be None, torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _candidates(view: ExportView, targets: tuple[str, ...] | None) -> list[str]:
    weights = [k for k in view.keys if k.endswith(".weight")]
    if targets is not None:
        chosen = [k for k in weights if contract.matches(k[: -len(".weight")], targets)]
        if not chosen:
            raise ValueError(f"`targets` {list(targets)} matches no layer (layers are module names such as "
                             f"{weights[0][: -len('.weight')]!r})" if weights else "the model has no weight")
        return chosen
    if view.masked:
        return [k for k in weights if k in view.masked]
    if view.linear is not None:
        return [k for k in weights if k in view.linear]
    return [k for k in weights if view.source(k).dim() == 2 and view.source(k).is_floating_point()]


def save_24(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    dirpath: str | os.PathLike,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    recipe: Mapping[str, Any] | None = None,
    prefix: str = "",
    overwrite: bool = False,
) -> ExportSummary:
    """Export 2:4 weights in compressed-tensors' ``sparse-24-bitmask`` layout (safetensors + config.json).

    Which weights are stored 2:4 (the targets): ``targets`` when given; otherwise the masked
    weights (``masks``, or the masks of the N:M components attached to the model, read through
    ``masks()``); otherwise every ``nn.Linear`` weight of a model, or every 2-D floating
    ``*.weight`` of a state dict. A target must be exactly 2:4 along its last dim (at most 2
    nonzeros in every group of 4) unless ``ignore`` names its layer; ignored targets, and
    targets that cannot take 2:4 (not 2-D, columns not a multiple of 4; one warning lists
    them), are stored dense. Masked weights are exported as the trained network computes with
    them, ``where(mask, W, 0)`` (:func:`sparsetrain.nm.nm_export_state_dict`), with ``-0.0``
    stored as ``+0.0``; the live model is only read.

    Args:
        model_or_state_dict: a model (with or without live sparsity components; a DDP wrapper
            stands for its module) or a plain state dict.
        dirpath: the export directory (created).
        masks: bool masks by parameter name (``"<layer>.weight"``) to use instead of the model's
            components' masks.
        targets: layer-name globs (``fnmatch``, as ``include``) of the weights to store 2:4.
        ignore: layer-name globs of target layers to store dense.
        dtype: cast floating tensors to ``torch.float32``, ``float16`` or ``bfloat16`` (None: keep).
        max_shard_bytes: the most tensor bytes in one safetensors file; more is split into
            ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
        recipe: recorded in ``config.json`` (e.g. the training recipe).
        prefix: export only the entries whose key starts with ``prefix``, named without it
            (``"model."`` exports the network a LightningModule holds as ``self.model``).
        overwrite: replace an existing export in ``dirpath``.

    Returns:
        An :class:`ExportSummary` (files, targets, sizes).

    Raises:
        TypeError: an argument of the wrong type (named).
        ValueError: a target weight that is not exactly 2:4 (naming the layer and its first bad
            group) or holds NaN/inf, ``targets`` matching nothing, a bad ``dtype`` or
            ``max_shard_bytes``, or ``dirpath`` holding an export without ``overwrite``.

    Example::

        >>> import tempfile, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1., 0, 2, 0] * 2, [0, 3, 0, 4] * 2]))
        >>> save_24(model, tempfile.mkdtemp()).targets
        ('0',)
    """
    ignore = check_globs(ignore, "ignore")
    targets = None if targets is None else check_globs(targets, "targets")
    dtype = check_dtype(dtype)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"`max_shard_bytes` must be a positive integer, got {max_shard_bytes!r}")
    if recipe is not None and not isinstance(recipe, Mapping):
        raise TypeError(f"`recipe` must be a mapping or None, got {type(recipe).__name__}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}")
    try:
        dirpath = Path(dirpath)
    except TypeError:
        raise TypeError(f"`dirpath` must be a path, got {type(dirpath).__name__}") from None
    view = export_view(model_or_state_dict, masks, prefix)

    # ------------------------------------------------------------------ what goes where
    candidates = _candidates(view, targets)
    ignored = [k for k in candidates if contract.matches(k[: -len(".weight")], ignore)]
    unfit = [k for k in candidates if k not in ignored and (view.source(k).dim() != 2 or view.source(k).shape[1] % 4
                                                            or not view.source(k).is_floating_point())]
    if unfit:
        warnings.warn(f"save_24: {len(unfit)} layer(s) cannot take 2:4 (not 2-D floating, or columns not a multiple "
                      f"of 4) and are stored dense: {', '.join(k[: -len('.weight')] for k in unfit)}", stacklevel=2)
    sparse = [k for k in candidates if k not in ignored and k not in unfit]
    sparse_set = set(sparse)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    groups: list[list[_files.Entry]] = []
    for key in view.keys:
        src = view.source(key)
        shape = tuple(src.shape)
        if key in sparse_set:
            layer = key[: -len(".weight")]
            rows, cols = shape
            groups.append([(f"{layer}.compressed", out_dtype(src), (rows, cols // 2)),
                           (f"{layer}.bitmask", torch.uint8, (rows, (cols + 7) // 8)),
                           (f"{layer}.shape", torch.int64, (2, 1))])
        else:
            groups.append([(key, out_dtype(src), shape)])
    shards = _files.plan_shards(groups, max_shard_bytes)

    # ------------------------------------------------------------------ every target 2:4, before writing
    # (one layer at a time; the view is computed again when written, so nothing is held meanwhile)
    for key in sparse:
        t = view.get(key)
        t = t.to(dtype) if dtype is not None else t
        layer = key[: -len(".weight")]
        check_24(t, layer)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{layer}: the weight holds NaN or inf; it cannot be exported")
        del t

    # ------------------------------------------------------------------ the directory
    old = [p for p in (dirpath.iterdir() if dirpath.is_dir() else ())
           if p.name in (CONFIG_NAME, _files.INDEX_NAME) or (p.name.startswith("model") and p.suffix == ".safetensors")]
    if old and not overwrite:
        raise ValueError(f"`dirpath` {str(dirpath)!r} already holds an export ({old[0].name}); pass overwrite=True "
                         "to replace it")
    dirpath.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.unlink()

    # ------------------------------------------------------------------ write, tensor by tensor
    zeros = entries = 0
    sparse_bytes = sparse_dense = total_dense = 0

    def produce(indices: list[int]) -> Iterator[torch.Tensor]:
        nonlocal zeros, entries, sparse_dense, total_dense
        for i in indices:
            key = view.keys[i]
            t = view.get(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if t.is_floating_point():
                entries += t.numel()
                zeros += t.numel() - int(torch.count_nonzero(t))
            total_dense += t.numel() * t.element_size()
            if key in sparse_set:
                layer = key[: -len(".weight")]
                compressed, bitmask, shape = compress_24(t, name=layer)
                sparse_dense += t.numel() * t.element_size()
                del t
                yield compressed
                yield bitmask
                yield shape
            else:
                yield t

    names = [_files.shard_name(i, len(shards)) for i in range(len(shards))]
    tensors: dict[str, dict[str, Any]] = {}
    try:
        for name, indices in zip(names, shards):
            entries_here = [e for i in indices for e in groups[i]]
            sums = _files.write_safetensors(dirpath / name, entries_here, produce(indices))
            for ename, edtype, eshape in entries_here:
                tensors[ename] = {"file": name, "dtype": dtype_name(edtype), "shape": list(eshape),
                                  "sha256": sums[ename]}
    except BaseException:  # no half export left behind: without config.json it would not load anyway
        for name in names:
            for path in (dirpath / name, dirpath / (name + ".tmp")):
                path.unlink(missing_ok=True)
        raise
    for key in sparse:
        layer = key[: -len(".weight")]
        sparse_bytes += sum(_files.nbytes((f"{layer}.{s}", *_info(tensors[f"{layer}.{s}"])))
                            for s in ("compressed", "bitmask", "shape"))
    total_bytes = sum(_files.nbytes((n, *_info(t))) for n, t in tensors.items())
    written = list(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": {n: t["file"] for n, t in tensors.items()}}
        (dirpath / _files.INDEX_NAME).write_text(json.dumps(index, indent=2))
        written.append(_files.INDEX_NAME)

    sparse_dtypes = {tensors[f"{k[: -len('.weight')]}.compressed"]["dtype"] for k in sparse}
    global_sparsity = zeros / entries if entries else 0.0
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sparsity_config": {
            "format": SPARSITY_FORMAT,
            "sparsity_structure": STRUCTURE,
            "targets": [k[: -len(".weight")] for k in sparse],
            "ignore": [k[: -len(".weight")] for k in candidates if k not in sparse_set],
            "global_sparsity": global_sparsity,
        },
        "dtype": (dtype_name(dtype) if dtype is not None else
                  next(iter(sparse_dtypes)) if len(sparse_dtypes) == 1 else "mixed" if sparse_dtypes else None),
        "model_class": view.model_class,
        "recipe": None if recipe is None else json.loads(json.dumps(dict(recipe), default=str)),
        "keys": view.keys,
        "files": names,
        "tensors": tensors,
    }
    tmp = dirpath / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=1))
    os.replace(tmp, dirpath / CONFIG_NAME)
    written.append(CONFIG_NAME)
    return ExportSummary(
        path=dirpath, files=tuple(written), targets=tuple(config["sparsity_config"]["targets"]),
        dense_layers=tuple(config["sparsity_config"]["ignore"]), sparse_bytes=sparse_bytes,
        sparse_dense_bytes=sparse_dense, total_bytes=total_bytes, dense_total_bytes=total_dense,
        file_bytes=sum((dirpath / f).stat().st_size for f in written), global_sparsity=global_sparsity)


def _info(entry: dict[str, Any]) -> tuple[torch.dtype, tuple[int, ...]]:
    return getattr(torch, entry["dtype"]), tuple(entry["shape"])
