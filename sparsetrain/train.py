"""Run a recipe with Lightning: the engine behind ``sparsetrain train``.

Writes into the output directory:

- ``checkpoints/last.ckpt``: the Lightning checkpoint, written every
  ``trainer.checkpoint_every_n_steps`` steps and at the end, atomically (written to a
  temporary file, then renamed), so a crash during a save never leaves a corrupt one;
- ``metrics.csv``: every logged metric (Lightning's CSV logger);
- ``report.png``: a one-page figure of the run;
- ``summary.json``: final metrics, timings and the recipe.

If ``checkpoints/last.ckpt`` exists, the run resumes from it (``resume=False`` starts
afresh): under torchrun with ``--max-restarts`` a restarted group picks up where the
last checkpoint left off. Under torchrun (or any launcher that sets ``LOCAL_RANK``,
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``), the processes it started are used as they are;
otherwise Lightning starts ``trainer.devices`` processes itself.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .demo.data import CorpusConfig, make_datasets
from .demo.lightning import DemoLM, MLPTask
from .demo.loader import ResumableLoader
from .demo.mlp import make_classification
from .demo.model import GPTConfig
from .recipe import Recipe, build_callbacks

__all__ = ["AtomicCheckpointIO", "PeriodicCheckpoint", "build_module", "train"]

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to ``<path>.tmp`` and renames, so a reader never sees a half-written file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class PeriodicCheckpoint(Callback):
    """Writes ``dirpath/last.ckpt`` every ``every_n_steps`` optimizer steps and at the end of training."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 0) -> None:
        if every_n_steps < 0:
            raise ValueError(f"`every_n_steps` must be >= 0, got {every_n_steps}")
        self.path = Path(dirpath) / LAST
        self.every_n_steps = every_n_steps
        self._saved_at = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._saved_at:
            trainer.save_checkpoint(self.path)
            self._saved_at = step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_at:
            trainer.save_checkpoint(self.path)
            self._saved_at = trainer.global_step


class _DataModule(pl.LightningDataModule):
    """The recipe's data, sharded by our own resumable loader (no DistributedSampler)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.train_loader: ResumableLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_loader is not None:
            return
        r = self.recipe
        if r.data.name == "stdlib_chars":
            corpus = CorpusConfig(byte_budget=r.data.byte_budget, block_size=r.model.block_size,
                                  val_fraction=r.data.val_fraction)
            self.train_set, self.val_set = make_datasets(corpus)
        else:
            full = make_classification(r.data.n, r.model.in_features, r.model.n_classes, r.data.seed)
            n_val = max(1, int(r.data.n * r.data.val_fraction))
            x, y = full.tensors
            self.train_set = torch.utils.data.TensorDataset(x[:-n_val], y[:-n_val])
            self.val_set = torch.utils.data.TensorDataset(x[-n_val:], y[-n_val:])
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        self.train_loader = ResumableLoader(self.train_set, r.data.batch_size, rank=rank, world_size=world,
                                            seed=r.trainer.seed)
        self.val_loader = ResumableLoader(self.val_set, r.data.batch_size, rank=rank, world_size=world,
                                          shuffle=False)

    def train_dataloader(self):
        return self.train_loader

    def val_dataloader(self):
        # A fresh pass over the same fixed validation batches every time.
        self.val_loader.epoch, self.val_loader.consumed, self.val_loader._started = 0, 0, False
        return self.val_loader


class _CountConsumed(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.train_loader.mark_consumed()


def build_module(recipe: Recipe) -> pl.LightningModule:
    """The LightningModule for the recipe's model and optimizer."""
    o = recipe.optimizer
    if recipe.model.name == "gpt":
        return DemoLM(model=GPTConfig(**recipe.model.gpt_kwargs()), optimizer=o.name, lr=o.lr,
                      weight_decay=o.weight_decay, momentum=o.momentum, warmup_steps=o.warmup_steps)
    m = recipe.model
    return MLPTask(in_features=m.in_features, hidden=m.hidden, n_classes=m.n_classes, optimizer=o.name,
                   lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def _launched_externally() -> tuple[int, int] | None:
    """(processes per node, nodes) when a launcher such as torchrun started us."""
    env = os.environ
    if "LOCAL_RANK" in env and "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return per_node, max(1, int(env["WORLD_SIZE"]) // per_node)
    return None


def _strategy(recipe: Recipe):
    t = recipe.trainer
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = "gloo" if t.accelerator == "cpu" else None
        return DDPStrategy(process_group_backend=backend)
    if t.strategy == "deepspeed":
        if t.accelerator == "cpu":
            raise ValueError("`trainer.strategy` 'deepspeed' needs `trainer.accelerator: gpu` (Lightning refuses CPU)")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=t.deepspeed_stage)
    return "auto"


def train(recipe: Recipe, out: str | Path, *, devices: int | None = None, max_steps: int | None = None,
          resume: bool = True, extra_callbacks: list[Callback] | None = None, report: bool = True) -> dict[str, Any]:
    """Train the recipe; return the summary written to ``out/summary.json`` (on every rank).

    Args:
        recipe: a validated recipe.
        out: output directory.
        devices: overrides ``trainer.devices``.
        max_steps: overrides ``trainer.max_steps``.
        resume: continue from ``out/checkpoints/last.ckpt`` when it exists.
        extra_callbacks: more Lightning callbacks (after the recipe's components).
        report: write ``report.png`` at the end.

    Raises:
        ValueError: ``devices`` or ``max_steps`` < 1.
    """
    if devices is not None and devices < 1:
        raise ValueError(f"`devices` must be >= 1, got {devices}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    t = recipe.trainer
    devices = devices or t.devices
    max_steps = max_steps or t.max_steps
    num_nodes = t.num_nodes
    if (launched := _launched_externally()) is not None:
        devices, num_nodes = launched
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / LAST
    ckpt_path = str(last) if resume and last.is_file() else None

    pl.seed_everything(t.seed, workers=True, verbose=False)
    module = build_module(recipe)
    data = _DataModule(recipe)
    components = build_callbacks(recipe)
    callbacks = [*components, *(extra_callbacks or []), _CountConsumed(),
                 PeriodicCheckpoint(ckpt_dir, t.checkpoint_every_n_steps)]
    logger = CSVLogger(save_dir=str(out), name="", version="")
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(recipe),
        precision=t.precision,
        max_steps=max_steps,
        val_check_interval=min(t.val_check_interval, max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=min(t.log_every_n_steps, max_steps),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()] if t.strategy != "deepspeed" else None,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        use_distributed_sampler=False,
        deterministic=t.deterministic,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - start
    final = trainer.validate(module, datamodule=data, verbose=False, weights_only=True)[0]
    summary = {
        "recipe": recipe.name,
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "resumed_from": ckpt_path,
        "fit_seconds": round(fit_seconds, 2),
        "final_val_loss": float(final.get("val_loss", float("nan"))),
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "components": [spec.get("name") for spec in recipe.callbacks],
        "component_summaries": {
            type(c).__name__: c.summary() for c in components if callable(getattr(c, "summary", None))
        },
        "parameters": sum(p.numel() for p in module.parameters()),
        "config": asdict(recipe),
    }
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if report:
            from .report import write_report

            write_report(out)
    return summary
