"""Lightning callback exporting the trained 2:4 weights: a thin adapter over :func:`sparsetrain.export.save_24`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain import contract
from sparsetrain.export import DEFAULT_MAX_SHARD_BYTES, ExportSummary, save_24
from sparsetrain.export.checkpoint import auto_prefix
from sparsetrain.export.save import check_dtype, check_globs

__all__ = ["SparseExport"]


class SparseExport(Callback):
    """Export the LightningModule's 2:4 weights at the end of training (``sparse-24-bitmask`` safetensors).

    At ``on_train_start`` it notes the weights the sparsity components attached to the module claim
    (read through :func:`sparsetrain.contract.claims`: the ``NMSparsity`` layers); at
    ``on_train_end`` global rank 0 writes :func:`~sparsetrain.export.save_24` of the module to
    ``dirpath``, with those layers as the 2:4 targets. The export is built from the exact N:M
    weights (the live masks through ``masks()`` while the sparsifier is attached, the
    finalized weights after it) into new tensors: the live model is never changed. A plain
    training loop does the same with one ``save_24(model, dirpath)`` call.

    Args:
        dirpath: the export directory (an existing export there is replaced).
        targets: layer-name globs of the 2:4 weights; None: the claimed weights noted at the
            start of training (all ``nn.Linear`` weights when none are).
        ignore: layer-name globs of target layers to store dense.
        dtype: cast floating tensors to ``torch.float32`` / ``float16`` / ``bfloat16`` (None: keep).
        max_shard_bytes: the most tensor bytes in one safetensors file.
        prefix: export only the keys under this prefix, without it; None: ``"model."`` when every
            key of the module starts with it (the recipe runner's modules), else none.
        recipe: a mapping recorded in ``config.json``.

    Attributes:
        last_export: the :class:`~sparsetrain.export.ExportSummary` of the last export (rank 0), or None.

    Raises:
        TypeError / ValueError: an argument of the wrong type or value, named.

    Example::

        trainer = pl.Trainer(callbacks=[NMSparsity(n=2, m=4, include=["*.mlp.*"]), SparseExport("export/")])
    """

    def __init__(self, dirpath: str | os.PathLike, *, targets: Sequence[str] | None = None,
                 ignore: Sequence[str] = (), dtype: torch.dtype | str | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, prefix: str | None = None,
                 recipe: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(dirpath, (str, os.PathLike)) or not str(dirpath):
            raise TypeError(f"`dirpath` must be a path, got {dirpath!r}")
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"`max_shard_bytes` must be a positive integer, got {max_shard_bytes!r}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string or None, got {prefix!r}")
        if recipe is not None and not isinstance(recipe, Mapping):
            raise TypeError(f"`recipe` must be a mapping or None, got {type(recipe).__name__}")
        self.dirpath = Path(dirpath)
        self.targets = None if targets is None else check_globs(targets, "targets")
        self.ignore = check_globs(ignore, "ignore")
        self.dtype = check_dtype(dtype)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.recipe = recipe
        self.last_export: ExportSummary | None = None
        self._claimed: list[str] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._claimed = [name[: -len(".weight")] for name in contract.claims(pl_module) if name.endswith(".weight")]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        prefix = auto_prefix(pl_module.state_dict()) if self.prefix is None else self.prefix
        targets = self.targets
        if targets is None and self._claimed:
            targets = [n[len(prefix):] if n.startswith(prefix) else n for n in self._claimed]
        self.last_export = save_24(pl_module, self.dirpath, targets=targets, ignore=self.ignore, dtype=self.dtype,
                                   max_shard_bytes=self.max_shard_bytes, recipe=self.recipe, prefix=prefix,
                                   overwrite=True)
