"""Lightning callback for dynamic sparse training, a thin adapter over `sparsetrain.sparsity.DynamicSparsifier`."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig

__all__ = ["DynamicSparsity"]


class DynamicSparsity(Callback):
    """Train the LightningModule sparse from the start (RigL, SET, static) or prune it gradually (GMP).

    At ``setup`` the callback attaches a :class:`~sparsetrain.sparsity.DynamicSparsifier` to the
    LightningModule: a persistent ``weight_mask`` buffer beside each selected weight (so the
    Trainer checkpoint carries the masks), the initial masks drawn from a generator seeded alike
    on every rank, the weights zeroed outside them, and the masks kept out of DDP's buffer
    broadcast. At ``on_train_start`` it derives the schedule from
    ``trainer.estimated_stepping_batches`` (optimizer steps, so gradient accumulation is
    respected) and hooks the optimizer: weights and all same-shape optimizer states stay exactly
    zero outside the masks (enforced after every ``optimizer.step()``, or only at mask updates and
    loads when the optimizer provably keeps them zero, see ``enforce_interval``), and the masks
    are updated on schedule, identically on every rank (all-reduced dense gradients, shared random generator,
    cross-rank checksum). Under Lightning's DeepSpeed strategy (ZeRO 1/2) the fp32 master weights
    are masked too (:class:`~sparsetrain.sparsity.deepspeed.DeepSpeedSparsity`).

    Logged after each mask update and at the Trainer's logging steps: ``sparsity/global``,
    ``sparsity/target``, ``sparsity/regrown`` (by the latest update), ``sparsity/regrown_total``,
    ``sparsity/updates``, ``sparsity/itop_rate`` and ``sparsity/drop_fraction`` (and
    ``sparsity/layer/<name>`` with ``log_per_layer``). The callback's checkpoint state (step, schedule, generator state,
    ever-active masks) resumes a crashed run bit for bit.

    Args:
        method: ``"rigl"``, ``"set"``, ``"gmp"`` or ``"static"``.
        sparsity: final fraction of zero weights over the sparsified layers, in [0, 1).
        distribution: layer-wise densities, ``"erk"``, ``"er"`` or ``"uniform"``.
        update_interval: optimizer steps between mask updates, >= 1.
        drop_fraction: RigL/SET fraction of active weights replaced at the first update, in [0, 1].
        drop_schedule: ``"cosine"`` (decays to 0 at ``end_fraction``) or ``"constant"``.
        begin_fraction: fraction of training before the first update (gmp: start of pruning), in [0, end_fraction).
        end_fraction: fraction of training after which masks are frozen, in (0, 1].
        include: module-name globs to sparsify (default: all Linear / Conv layers).
        exclude: module-name globs to keep dense.
        keep_first_dense: keep the first selected layer dense.
        keep_last_dense: keep the last selected layer dense.
        seed: seed of the mask generator (the same on every rank).
        check_sync: compare a checksum of the masks across ranks after every update.
        enforce_interval: ``"auto"`` (default): enforce the masks on weights and optimizer states
            after every step only when the optimizer is not one of
            :data:`~sparsetrain.sparsity.ZERO_PRESERVING_OPTIMIZERS` (or DeepSpeed is used); an int
            ``N >= 1``: after every N-th step (see :class:`~sparsetrain.sparsity.DynamicSparsityConfig`).
        grad_masking: ``"auto"`` (default), ``"hook"`` (a gradient hook per layer) or ``"step"``
            (one pass before each optimizer step, called here before Lightning clips gradients;
            cheaper for small steps, not for DeepSpeed or gradient compression; see
            :class:`~sparsetrain.sparsity.DynamicSparsityConfig`). ``"auto"`` picks ``"step"``
            unless the Trainer uses the DeepSpeed strategy, a DDP strategy with a communication
            hook, or a :class:`~sparsetrain.callbacks.GradientCompression` callback: training is
            the same bit for bit either way, and ``"step"`` saves a Python call per layer and
            backward pass.
        log_stats: log the statistics after each update.
        log_per_layer: also log each layer's sparsity.

    Raises:
        ValueError: any argument out of range (named in the message).

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[DynamicSparsity(method="rigl", sparsity=0.9)])
    """

    def __init__(
        self,
        method: Literal["rigl", "set", "gmp", "static"] = "rigl",
        sparsity: float = 0.8,
        distribution: Literal["erk", "er", "uniform"] = "erk",
        update_interval: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: Literal["cosine", "constant"] = "cosine",
        begin_fraction: float = 0.0,
        end_fraction: float = 0.75,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        keep_first_dense: bool = False,
        keep_last_dense: bool = False,
        seed: int = 0,
        check_sync: bool = True,
        enforce_interval: int | Literal["auto"] = "auto",
        grad_masking: Literal["auto", "hook", "step"] = "auto",
        log_stats: bool = True,
        log_per_layer: bool = False,
    ) -> None:
        super().__init__()
        if grad_masking not in ("auto", "hook", "step"):
            raise ValueError(f"`grad_masking` must be 'auto', 'hook' or 'step', got {grad_masking!r}")
        self.grad_masking = grad_masking
        self.config = DynamicSparsityConfig(
            method=method, sparsity=sparsity, distribution=distribution, update_interval=update_interval,
            drop_fraction=drop_fraction, drop_schedule=drop_schedule, begin_fraction=begin_fraction,
            end_fraction=end_fraction, include=include, exclude=exclude or (),
            keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense, seed=seed, check_sync=check_sync,
            enforce_interval=enforce_interval, grad_masking="hook" if grad_masking == "auto" else grad_masking,
        )
        self.log_stats = log_stats
        self.log_per_layer = log_per_layer
        self.sparsifier: DynamicSparsifier | None = None
        self._deepspeed: Any = None
        self._pending_state: dict[str, Any] | None = None
        self._logged_step = -1
        self._initial_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.sparsifier is not None and self.sparsifier.model is pl_module:
            return  # a second fit on the same module keeps its masks
        if self.grad_masking == "auto":
            self.config.grad_masking = "hook" if self._gradients_read_before_step(trainer) else "step"
        self.sparsifier = DynamicSparsifier(pl_module, self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sp = self.sparsifier
        if sp is None:
            raise RuntimeError("DynamicSparsity.on_train_start before setup('fit')")
        if self._is_deepspeed(trainer):
            if self.config.grad_masking == "step":
                raise ValueError("DynamicSparsity(grad_masking='step') cannot mask DeepSpeed's gradients before its "
                                 "optimizer step: use grad_masking='hook' with the DeepSpeed strategy")
            from sparsetrain.sparsity.deepspeed import DeepSpeedSparsity

            self._deepspeed = DeepSpeedSparsity(sp, trainer.model)
        elif all(sp._step_hook_optimizer is not opt for opt in trainer.optimizers):
            sp.detach_optimizers()  # a new fit builds new optimizers
            self._attach_optimizers(trainer, sp)
        if self._pending_state is not None:
            sp.load_state_dict(self._pending_state)  # carries the original run's schedule
            self._pending_state = None
            if self._deepspeed is not None:
                self._deepspeed.load_state_dict(sp.state_dict())
        elif sp.schedule is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ValueError(
                    f"DynamicSparsity needs a finite number of training steps, got {total}: set `max_steps` "
                    "or `max_epochs` on the Trainer"
                )
            sp.set_total_steps(int(total))
        if sp.step_count != trainer.global_step:
            warnings.warn(
                f"DynamicSparsity has seen {sp.step_count} optimizer steps but the Trainer is at global_step "
                f"{trainer.global_step}; the mask schedule follows its own count",
                stacklevel=2,
            )
        sp.check_masks_in_sync()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.sparsifier is not None:
            self.sparsifier.mask_gradients()  # grad_masking="step": before Lightning clips them

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        sp = self.sparsifier
        if sp is None:
            return
        if self._deepspeed is not None:
            self._deepspeed.step()
        if not self.log_stats:
            return
        stats = sp.last_statistics
        fresh = stats is not None and stats["step"] != self._logged_step
        # Between updates, log only when the Trainer writes logs (the figures change only at updates).
        due = bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", False))
        if not (fresh or due):
            return
        if stats is None:
            stats = self._initial_stats = self._initial_stats or {
                **sp.statistics(), "regrown": 0, "drop_fraction": 0.0,
                "target_sparsity": sp.schedule.sparsity_at(0) if sp.schedule else self.config.sparsity}
        self._logged_step = stats["step"]
        values = {
            "sparsity/global": stats["sparsity"],
            "sparsity/target": stats["target_sparsity"],
            "sparsity/regrown": float(stats["regrown"]),
            "sparsity/regrown_total": float(stats["regrown_total"]),
            "sparsity/updates": float(stats["updates"]),
            "sparsity/itop_rate": stats["itop_rate"],
            "sparsity/drop_fraction": stats["drop_fraction"],
        }
        if self.log_per_layer:
            values.update({f"sparsity/layer/{n}": s for n, s in stats["layer_sparsity"].items()})
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is not None:
            return self.sparsifier.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ helpers

    @classmethod
    def _gradients_read_before_step(cls, trainer: pl.Trainer) -> bool:
        """Whether something reads the gradients between the backward pass and the optimizer step
        that must see them masked: DeepSpeed, a DDP communication hook, gradient compression."""
        from .compression import GradientCompression

        if trainer is None:  # setup() called by hand, to attach before fitting
            return False
        return (cls._is_deepspeed(trainer) or getattr(trainer.strategy, "_ddp_comm_hook", None) is not None
                or any(isinstance(c, GradientCompression) for c in trainer.callbacks))

    @staticmethod
    def _is_deepspeed(trainer: pl.Trainer) -> bool:
        try:
            from lightning.pytorch.strategies import DeepSpeedStrategy
        except ImportError:  # pragma: no cover - always present in lightning 2.x
            return False
        return isinstance(trainer.strategy, DeepSpeedStrategy)

    @staticmethod
    def _attach_optimizers(trainer: pl.Trainer, sp: DynamicSparsifier) -> None:
        weights = {id(w) for w, _ in sp._pairs()}
        holding = [
            opt for opt in trainer.optimizers
            if any(id(p) in weights for g in opt.param_groups for p in g["params"])
        ]
        if not holding:
            raise ValueError("DynamicSparsity: no optimizer of the Trainer holds the sparsified weights")
        if not all(isinstance(opt, torch.optim.Optimizer) for opt in holding):
            names = ", ".join(type(o).__name__ for o in holding)
            raise ValueError(f"DynamicSparsity needs torch.optim optimizers, got {names}")
        for i, opt in enumerate(holding):
            sp.attach_optimizer(opt, hook=i == 0)
