"""Run a recipe with Lightning: the engine behind ``sparsetrain train``.

Writes into the output directory:

- ``checkpoints/last.ckpt``: the Lightning checkpoint, written every
  ``trainer.checkpoint_every_n_steps`` steps and at the end, atomically (written to a
  temporary file, checked to load, then renamed; the one before is kept as
  ``checkpoints/last.prev.ckpt``), so a crash during a save never leaves a corrupt one;
- ``metrics.csv``: every logged metric (Lightning's CSV logger); a resumed run keeps the
  rows up to the step it resumes from and appends its own;
- ``report.png``: a one-page figure of the run;
- ``summary.json``: final metrics, timings and the recipe.

If ``checkpoints/last.ckpt`` exists, the run resumes from it (``resume=False`` starts
afresh): under torchrun with ``--max-restarts`` a restarted group picks up where the
last checkpoint left off. A ``last.ckpt`` that does not load is skipped for
``last.prev.ckpt`` with a warning naming it; when none loads, the run stops with one line.
Rank 0 decides what to resume from and every rank checks that it reads the same file
under its own run directory: with several nodes the run directory must be on storage
every node shares (otherwise the run stops at once, naming the node that cannot read it).
A resume mid-epoch is bit-exact only with the demo data's resumable loader: with a user's
``LightningDataModule`` the batches after a mid-epoch resume are not those of an
uninterrupted run. Under torchrun (or any launcher that sets ``LOCAL_RANK``,
``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``), the processes it started are used as they are;
otherwise Lightning starts ``trainer.devices`` processes itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

from . import _warn
from .demo.data import CorpusConfig, make_datasets
from .demo.lightning import DemoLM, MLPTask
from .demo.loader import ResumableLoader
from .demo.mlp import make_classification
from .demo.model import GPTConfig
from .recipe import LOSSES, Recipe, RecipeError, build_callbacks, import_class

__all__ = [
    "HEADLINE_KEYS",
    "AtomicCheckpointIO",
    "ModelTask",
    "PeriodicCheckpoint",
    "ProgressLine",
    "build_data",
    "build_module",
    "check_recipe",
    "headline_statistics",
    "layer_sparsity",
    "read_checkpoint_step",
    "resume_checkpoint",
    "train",
    "warnings_on_rank_zero_only",
]

LAST = "last.ckpt"


PREVIOUS = "last.prev.ckpt"


def read_checkpoint_step(path: str | Path) -> int:
    """Load a Lightning checkpoint without executing code (``weights_only``) and return its step.

    Raises:
        ValueError: the file is unreadable, truncated, or not a Lightning checkpoint (naming it and why).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  truncated zip, unpickling error, ... : all mean "corrupt"
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise ValueError(f"{path}: not a Lightning checkpoint (no state_dict / global_step)")
    return int(state["global_step"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to ``<path>.tmp``, checks that it loads, keeps the previous file as ``last.prev.ckpt``
    (for ``last.ckpt``), then renames: a reader never sees a half-written file, and a checkpoint
    found corrupt later (a disk error, a copy cut short) still has a valid predecessor."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        try:
            read_checkpoint_step(tmp)
        except ValueError as err:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"the checkpoint just written does not load back, {path} is left as it was: "
                               f"{err}") from None
        if path.name == LAST and path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)


def resume_checkpoint(ckpt_dir: str | Path) -> tuple[Path, int] | None:
    """The newest valid checkpoint in ``ckpt_dir`` (``last.ckpt``, else ``last.prev.ckpt``) and its step.

    A file that does not load is skipped with a warning naming it and why.

    Returns:
        ``(path, global_step)``, or None when there is no checkpoint at all.

    Raises:
        ValueError: there are checkpoints and none loads (one line naming them).
    """

    ckpt_dir = Path(ckpt_dir)
    problems = []
    for name in (LAST, PREVIOUS):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            step = read_checkpoint_step(path)
        except ValueError as err:
            problems.append(str(err))
            continue
        if problems:
            _warn.warn(f"resuming from {path} (step {step}): {'; '.join(problems)}", stacklevel=2)
        return path, step
    if problems:
        raise ValueError(f"no valid checkpoint to resume from in {ckpt_dir}: {'; '.join(problems)}; "
                         "remove it or pass --no-resume to start afresh")
    return None


class _AgreeOnResume(Callback):
    """Every rank resumes from the same checkpoint, or the run stops at once with one message.

    Rank 0 decides (its run directory's checkpoint and step) and broadcasts the decision;
    every rank checks that it would resume from the same file name and step under its own
    run directory. Node-local run directories (only node 0 holds the checkpoint rank 0
    wrote) would otherwise leave one node resuming and another starting afresh, and the job
    hanging in the first collective that the two disagree on.
    """

    def __init__(self, decision: tuple[str, int] | None, out: Path) -> None:
        self.decision, self.out = decision, out

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        if stage != "fit" or trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        box = [self.decision]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
        mine = self.decision
        if chosen is not None and mine != chosen:
            # Can this rank read rank 0's file under its own run directory at all?
            try:
                mine = (chosen[0], read_checkpoint_step(self.out / chosen[0]))
            except ValueError:
                mine = None
        views = [None] * trainer.world_size
        dist.all_gather_object(views, (trainer.global_rank, trainer.node_rank, mine))
        bad = [(r, n, v) for r, n, v in views if v != chosen]
        if not bad:
            return
        r, n, v = bad[0]
        if chosen is None:
            raise ValueError(f"rank 0 starts afresh but rank {r} (node {n}) would resume from {v[0]} at step {v[1]}: "
                             "the run directory must be on storage every node shares, or pass --no-resume")
        seen = "cannot read it" if v is None else f"reads step {v[1]} there"
        raise ValueError(f"node {n} (rank {r}) cannot resume from {chosen[0]} at step {chosen[1]} like rank 0 "
                         f"({seen}): the run directory must be on storage every node shares, or pass --no-resume")


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
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, said so
            self._saved_at = step

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, said so
            self._saved_at = trainer.global_step


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that the rows already in ``metrics.csv`` stay.

    Lightning's writer deletes an existing ``metrics.csv``; a resumed run would then lose
    the history before the crash. Here the rows logged up to ``keep_until_step`` (the step
    of the checkpoint resumed from) are kept, the rows after it (steps the resumed run does
    again) dropped, and new rows appended (the header grows when new metrics appear).
    """

    def __init__(self, log_dir: str, keep_until_step: int) -> None:
        self._keep_until_step = keep_until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        import csv

        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _row_step(r) <= self._keep_until_step]
        self.metrics_keys = sorted(keys)
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def _row_step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class _HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<out>/metrics.csv``; a resumed run keeps the rows it resumes from."""

    def __init__(self, save_dir: str, keep_until_step: int | None) -> None:
        super().__init__(save_dir=save_dir, name="", version="")
        self._keep_until_step = keep_until_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            if self._keep_until_step is None:
                self._experiment = ExperimentWriter(log_dir=self.log_dir)
            else:
                self._experiment = _KeepingWriter(self.log_dir, self._keep_until_step)
        return self._experiment


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


#: The achieved figures a progress line shows, when a component reports them.
HEADLINE_KEYS = ("sparsity/global", "nm/density", "compression/ratio", "compression/total_ratio")


def headline_statistics(components: list[Any]) -> dict[str, float]:
    """The components' achieved figures worth a progress line: the :data:`HEADLINE_KEYS` among
    their ``statistics()``, in that order."""
    found: dict[str, float] = {}
    for c in components:
        stats_fn = getattr(c, "statistics", None)
        if callable(stats_fn):
            stats = stats_fn()
            found.update({k: float(stats[k]) for k in HEADLINE_KEYS if isinstance(stats.get(k), (int, float))})
    return {k: found[k] for k in HEADLINE_KEYS if k in found}


class ProgressLine(Callback):
    """One line every ``every_n_steps`` optimizer steps, on rank 0 only::

        step 100/300  loss 2.412  9.8 steps/s  627 samples/s  sparsity/global 0.800  compression/total_ratio 41.3

    The loss is rank 0's last micro-batch; throughput counts every rank's samples since the
    previous line; the rest are the components' achieved ``statistics()``.
    """

    def __init__(self, every_n_steps: int, components: list[Any]) -> None:
        if every_n_steps < 0:
            raise ValueError(f"`every_n_steps` must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.components = every_n_steps, components
        self._last: tuple[float, int] | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or not trainer.is_global_zero:
            return
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        self._samples += int(getattr(first, "shape", [0])[0] or 0) * trainer.world_size
        step = trainer.global_step
        now = time.perf_counter()
        if self._last is None:
            self._last, self._samples = (now, step), 0
            return
        if step == self._last[1] or (step % self.every_n_steps and step != trainer.max_steps):
            return
        seconds, steps = now - self._last[0], step - self._last[1]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"step {step}/{trainer.max_steps}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4g}")
        parts.append(f"{steps / seconds:.3g} steps/s  {self._samples / seconds:.4g} samples/s")
        parts += [f"{k} {v:.4g}" for k, v in headline_statistics(self.components).items()]
        print("  ".join(parts), flush=True)
        self._last, self._samples = (now, step), 0


def layer_sparsity(components: list[Any]) -> dict[str, dict[str, float]]:
    """Per component with masks (``component.masks()``), each layer's achieved sparsity (share of zeros)."""
    out: dict[str, dict[str, float]] = {}
    for c in components:
        inner = getattr(c, "component", None)
        if inner is None or not callable(getattr(inner, "masks", None)):
            continue
        masks = dict(inner.masks())
        if masks:
            out[type(c).__name__] = {name: round(1.0 - float(m.float().mean()), 6) for name, m in masks.items()}
    return out


def _summaries(recipe: Recipe, components: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each component's ``summary()`` (achieved figures) and its configuration, by class name
    (``Name[i]`` for a second instance of a class)."""
    achieved: dict[str, Any] = {}
    configured: dict[str, Any] = {}
    for i, (c, spec) in enumerate(zip(components, recipe.callbacks, strict=True)):
        key = type(c).__name__
        if key in achieved:
            key = f"{key}[{i}]"
        achieved[key] = c.summary() if callable(getattr(c, "summary", None)) else {}
        configured[key] = {k: v for k, v in spec.items() if k != "name"}
    return achieved, configured


class _CountConsumed(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.datamodule.train_loader.mark_consumed()


class ModelTask(pl.LightningModule):
    """A plain ``nn.Module`` trained with a named loss on batches ``(inputs, targets)``.

    Logs ``train_loss`` and ``val_loss`` (and ``val_acc`` for ``cross_entropy``). Logits of shape
    ``(..., classes)`` are flattened against targets of shape ``(...)`` for ``cross_entropy``.

    Args:
        model: the network.
        loss: ``cross_entropy``, ``mse`` or ``l1``.
        optimizer, lr, weight_decay, momentum, warmup_steps: as in a recipe's ``optimizer``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``loss`` or an invalid optimizer setting.
    """

    def __init__(self, model: torch.nn.Module, loss: str = "cross_entropy", optimizer: str = "adamw",
                 lr: float = 3e-3, weight_decay: float = 0.0, momentum: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
        from .demo.lightning import _check_optim_args

        _check_optim_args(optimizer, lr, weight_decay, momentum)
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        self.model = model
        self.loss_name, self.optimizer_name, self.lr = loss, optimizer, lr
        self.weight_decay, self.momentum, self.warmup_steps = weight_decay, momentum, warmup_steps

    def forward(self, x):
        return self.model(x)

    def _loss(self, batch):
        x, y = batch
        out = self.model(x)
        if self.loss_name == "cross_entropy":
            return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), out
        fn = torch.nn.functional.mse_loss if self.loss_name == "mse" else torch.nn.functional.l1_loss
        return fn(out, y), out

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, out = self._loss(batch)
        self.log("val_loss", loss, sync_dist=True)
        if self.loss_name == "cross_entropy":
            acc = (out.argmax(-1) == batch[1]).float().mean()
            self.log("val_acc", acc, sync_dist=True)

    def configure_optimizers(self):
        from .demo.lightning import _optimizer_with_warmup

        return _optimizer_with_warmup(self)


def build_network(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model as it is named: the user's class constructed, or the demo module."""
    m = recipe.model
    if m.class_path is not None:
        cls = import_class(m.class_path, "model.class_path")
        try:
            return cls(**m.init_args)
        except Exception as err:  # the user's constructor: anything it raises is about its arguments
            raise RecipeError(f"model.init_args: {cls.__qualname__} refused them: "
                              f"{type(err).__name__}: {err}") from err
    return build_module(recipe)


def build_module(recipe: Recipe) -> pl.LightningModule:
    """The LightningModule for the recipe's model and optimizer."""
    o = recipe.optimizer
    if recipe.model.class_path is not None:
        net = build_network(recipe)
        if isinstance(net, pl.LightningModule):
            return net
        return ModelTask(net, loss=recipe.model.loss, optimizer=o.name, lr=o.lr, weight_decay=o.weight_decay,
                         momentum=o.momentum, warmup_steps=o.warmup_steps)
    if recipe.model.name == "gpt":
        return DemoLM(model=GPTConfig(**recipe.model.gpt_kwargs()), optimizer=o.name, lr=o.lr,
                      weight_decay=o.weight_decay, momentum=o.momentum, warmup_steps=o.warmup_steps)
    m = recipe.model
    return MLPTask(in_features=m.in_features, hidden=m.hidden, n_classes=m.n_classes, optimizer=o.name,
                   lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def build_data(recipe: Recipe) -> pl.LightningDataModule:
    """The recipe's data module: the user's ``class_path`` constructed, or the demo data."""
    d = recipe.data
    if d.class_path is None:
        return _DataModule(recipe)
    cls = import_class(d.class_path, "data.class_path")
    try:
        return cls(**d.init_args)
    except Exception as err:  # the user's constructor
        raise RecipeError(f"data.init_args: {cls.__qualname__} refused them: {type(err).__name__}: {err}") from err


def _available_devices(accelerator: str) -> tuple[int, str]:
    if accelerator == "cpu":
        try:
            return len(os.sched_getaffinity(0)), "CPU cores"
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1, "CPU cores"
    return torch.cuda.device_count(), "GPUs"


def _build_for_check(recipe: Recipe) -> tuple[torch.nn.Module, str]:
    """The LightningModule, on the meta device where its constructor allows it (no memory, no init)."""
    try:
        with torch.device("meta"):
            return build_module(recipe), "meta"
    except Exception:  # noqa: BLE001  a constructor that computes on its tensors: build it for real
        return build_module(recipe), "cpu"


def check_recipe(recipe: Recipe, *, devices: int | None = None, check_devices: bool = True) -> list[str]:
    """Build what can be built without training; return one line per thing built.

    Builds the model (on the meta device where possible) and runs every component's layer
    selection on it, so an ``include`` that matches no layer, an ``m`` that divides no selected
    layer or two components claiming the same layers fail here instead of in every rank; the
    number of processes (or GPUs) is checked against this machine unless a launcher started us
    or ``check_devices`` is False (the launcher's own check: the run may be on other machines).

    Raises:
        RecipeError: naming the key path.
    """
    from .components import component_class
    from .contract import select_layers
    from .nm import select_nm_layers

    t = recipe.trainer
    lines = []
    if check_devices and _launched_externally() is None and t.accelerator != "auto":
        wanted = devices or t.devices
        have, what = _available_devices(t.accelerator)
        if wanted > have:
            key = "--devices" if devices else "trainer.devices"
            raise RecipeError(f"{key}: {wanted} processes asked for, this machine has {have} {what}")
    module, where = _build_for_check(recipe)
    n_params = sum(p.numel() for p in module.parameters())
    lines.append(f"model: {type(module).__name__} built on {where}, {n_params:,} parameters")
    claimed: dict[str, str] = {}

    for i, spec in enumerate(recipe.callbacks):
        path = f"callbacks[{i}]"
        cls = component_class(spec["name"])
        fields = cls.config_fields() if hasattr(cls, "config_fields") else {}
        if "include" not in fields:
            lines.append(f"{path} {spec['name']}: built")
            continue
        import dataclasses

        kw = {k: f.default for k, f in fields.items() if f.default is not dataclasses.MISSING}
        kw.update({k: v for k, v in spec.items() if k != "name"})
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if "m" in fields:
                    ms = [m for _, m in kw["stages"]] if kw.get("stages") else [kw["m"]]
                    layers = select_nm_layers(module, ms, kw.get("include"), kw.get("exclude"))
                else:
                    opts = {k: kw[k] for k in ("keep_first_dense", "keep_last_dense") if k in kw}
                    layers = select_layers(module, include=kw.get("include"), exclude=kw.get("exclude") or (),
                                           **opts)
        except ValueError as err:
            msg = str(err)
            key = next((k for k in ("include", "exclude", "m") if f"`{k}`" in msg), None)
            raise RecipeError(f"{path}.{key}: {msg}" if key else f"{path}: {msg}") from err
        for w in caught:
            lines.append(f"{path} {spec['name']}: warning: {w.message}")
        both = sorted(set(layers) & set(claimed))
        if both and spec["name"] != "gradient_compression":
            raise RecipeError(f"{path}.include: layers also sparsified by {claimed[both[0]]}: {', '.join(both)}; "
                              "give each layer to one sparsifying component (include / exclude)")
        claimed.update({name: path for name in layers})
        names = list(layers)
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        lines.append(f"{path} {spec['name']}: {len(names)} layer(s): {shown}")
    return lines


@contextlib.contextmanager
def warnings_on_rank_zero_only(rank: int):
    """Within the block, Python warnings are shown by rank 0 only.

    Every rank runs the same code on the same recipe, so a warning (a skipped layer, a schedule
    that never fires) would otherwise be printed once per process. Errors are not affected.
    """
    if rank == 0:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
    found = resume_checkpoint(ckpt_dir) if resume else None
    ckpt_path = str(found[0]) if found else None
    decision = (str(found[0].relative_to(out)), found[1]) if found else None

    pl.seed_everything(t.seed, workers=True, verbose=False)
    module = build_module(recipe)
    data = build_data(recipe)
    ours = isinstance(data, _DataModule)
    components = build_callbacks(recipe)
    callbacks = [_AgreeOnResume(decision, out), *components, *(extra_callbacks or []),
                 *([_CountConsumed()] if ours else []), PeriodicCheckpoint(ckpt_dir, t.checkpoint_every_n_steps),
                 ProgressLine(t.progress_every_n_steps, components)]
    logger = _HistoryCSVLogger(str(out), found[1] if found else None)
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
        use_distributed_sampler=not ours,
        deterministic=t.deterministic,
    )
    start = time.perf_counter()
    with warnings_on_rank_zero_only(trainer.global_rank):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - start
        final = trainer.validate(module, datamodule=data, verbose=False, weights_only=True)[0]
    achieved, configured = _summaries(recipe, components)
    summary = {
        "recipe": recipe.name,
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "resumed_from": ckpt_path,
        "fit_seconds": round(fit_seconds, 2),
        "final_val_loss": float(final.get("val_loss", float("nan"))),
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "components": [spec.get("name") for spec in recipe.callbacks],
        "component_summaries": achieved,
        "component_configs": configured,
        "layer_sparsity": layer_sparsity(components),
        "parameters": sum(p.numel() for p in module.parameters()),
        "config": asdict(recipe),
    }
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if report:
            from .report import write_report

            write_report(out)
    return summary
