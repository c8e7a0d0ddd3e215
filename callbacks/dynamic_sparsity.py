"""Lightning callback for dynamic sparse training, a thin adapter over `sparsetrain.sparsity.DynamicSparsifier`."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from sparsetrain import _warn
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig

from ._base import ComponentCallback, check_bool

__all__ = ["DynamicSparsity"]


def _renamed(old: str, old_value: Any, new: str, new_value: Any) -> dict[str, Any]:
    """A renamed argument as the config keyword to pass: the new name's, else the old one's (with a
    FutureWarning; the config accepts and checks it under that name), else nothing (the default)."""
    if old_value is None:
        return {} if new_value is None else {new: new_value}
    if new_value is not None:
        raise ValueError(f"give `{new}` only (`{old}` is its deprecated spelling), got both")
    _warn.warn(f"`{old}` is deprecated: use `{new}`", FutureWarning, stacklevel=3)
    return {old: old_value}


class DynamicSparsity(ComponentCallback):
    """Train the LightningModule sparse from the start (RigL, SET, static, Top-KAST) or prune it gradually (GMP).

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
    cross-rank fingerprint check). Under Lightning's DeepSpeed strategy (ZeRO 1/2) the fp32 master weights
    are masked too (:class:`~sparsetrain.sparsity.deepspeed.DeepSpeedSparsity`).

    Logged after each mask update and at the Trainer's logging steps: the sparsifier's
    :meth:`~sparsetrain.sparsity.DynamicSparsifier.statistics` (``sparsity/global``,
    ``sparsity/target``, ``sparsity/regrown`` by the latest update, ``sparsity/regrown_total``,
    ``sparsity/updates``, ``sparsity/itop_rate``, ``sparsity/drop_fraction``, ...), the
    ``sparsity/layer/<name>`` keys only with ``log_per_layer``; :meth:`summary` returns them all
    for the run summary. The callback's checkpoint state (the sparsifier's ``state_dict()``: step,
    schedule, generator state, ever-active masks) resumes a crashed run bit for bit. Each instance
    has its own ``state_key`` (over ``method``, ``include`` and ``exclude``), so two callbacks on
    different layers coexist in one Trainer.

    Args:
        method: ``"rigl"``, ``"set"``, ``"gmp"``, ``"static"`` or ``"topkast"`` (Top-KAST: the masks are
            its forward sets; its backward sets are what gradient compression and
            :class:`~sparsetrain.callbacks.MaskedExchange` see; ``docs/dynamic_sparsity.md``).
        sparsity: final fraction of zero weights over the sparsified layers, in [0, 1).
        distribution: layer-wise densities, ``"erk"``, ``"er"`` or ``"uniform"``.
        update_every: optimizer steps between mask updates, >= 1 (default 100).
        drop_fraction: RigL/SET fraction of active weights replaced at the first update, in [0, 1].
        drop_schedule: ``"cosine"`` (decays to 0 at ``end_fraction``) or ``"constant"``.
        begin_fraction: fraction of training before the first update (gmp: start of pruning), in [0, end_fraction).
        end_fraction: fraction of training after which masks are frozen, in (0, 1].
        include: module-name globs to sparsify (default: all Linear / Conv layers); MoE expert stacks are
            matched by parameter name and sparsified per expert only when named (``"model.*.experts.w*"``).
        exclude: module-name (or expert-stack parameter-name) globs to keep dense.
        keep_first_dense: keep the first selected layer dense.
        keep_last_dense: keep the last selected layer dense.
        seed: seed of the mask generator (the same on every rank).
        verify_every: compare a fingerprint of the masks across ranks at the start, after every
            update and every ``verify_every`` optimizer steps (0: never; default 1).
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
        backward_extra: Top-KAST's M, the backward set's extra fraction of each layer (default 0.1).
        exploration_penalty: Top-KAST's L2 scale lambda of the exploration penalty (default 1e-4).
        log_stats: log the statistics after each update.
        log_per_layer: also log each layer's sparsity.
        update_interval: deprecated spelling of ``update_every`` (a ``FutureWarning``).
        check_sync: deprecated: ``verify_every=1`` (``True``) or ``0`` (``False``), with a ``FutureWarning``.
        fresh_state_ok: resuming from a checkpoint without this callback's state draws fresh masks
            and a new schedule with a warning; False (default): an error.

    Resuming with a longer run (``Trainer(max_steps=...)`` larger than the checkpoint's run): the
    schedule is recomputed from the saved config for the new length, keeping the steps already
    taken, and a warning says so (``docs/dynamic_sparsity.md``).

    Raises:
        ValueError: any argument out of range (named in the message).

    Example::

        trainer = pl.Trainer(max_steps=10_000, callbacks=[DynamicSparsity(method="rigl", sparsity=0.9)])
    """

    config_class = DynamicSparsityConfig
    _state_key_fields = ("method", "include", "exclude")
    # module_types holds classes (not for recipes); grad_masking is the callback's own ("auto" added)
    _hidden_fields = ("module_types",)

    def __init__(
        self,
        *,
        grad_masking: Literal["auto", "hook", "step"] = "auto",
        log_stats: bool = True,
        log_per_layer: bool = False,
        update_interval: int | None = None,
        check_sync: bool | None = None,
        fresh_state_ok: bool = False,
        **config_fields: Any,
    ) -> None:
        config_fields = self.split_kwargs(config_fields)
        if grad_masking not in ("auto", "hook", "step"):
            raise ValueError(f"`grad_masking` must be 'auto', 'hook' or 'step', got {grad_masking!r}")
        config_fields.update(_renamed("update_interval", update_interval, "update_every",
                                      config_fields.pop("update_every", None)))
        config_fields.update(_renamed("check_sync", check_sync, "verify_every",
                                      config_fields.pop("verify_every", None)))
        super().__init__(fresh_state_ok=fresh_state_ok, **config_fields)
        self.grad_masking = grad_masking
        check_bool("log_stats", log_stats)
        check_bool("log_per_layer", log_per_layer)
        with warnings.catch_warnings():  # warned above, once, naming this callback's argument
            warnings.simplefilter("ignore", FutureWarning)
            self.config = DynamicSparsityConfig(
                **config_fields, grad_masking="hook" if grad_masking == "auto" else grad_masking)
        self.log_stats = log_stats
        self.log_per_layer = log_per_layer
        self._deepspeed: Any = None
        self._logged_updates = -1

    @property
    def sparsifier(self) -> DynamicSparsifier | None:
        """The core :class:`~sparsetrain.sparsity.DynamicSparsifier` (None before ``setup``)."""
        return self.component

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.sparsifier is not None and self.sparsifier.model is pl_module:
            return  # a second fit on the same module keeps its masks
        if self.grad_masking == "auto":
            self.config.grad_masking = "hook" if self._gradients_read_before_step(trainer) else "step"
        # A module that splits its experts at setup (MoEDemoLM) does it now: Lightning runs the callbacks'
        # setup before the module's, and the masks must be built on the experts this rank holds.
        prepare = getattr(pl_module, "setup_expert_parallel", None)
        if callable(prepare):
            prepare()
        self.component = DynamicSparsifier(pl_module, self.config)

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
        pending = self.take_pending()
        if pending is not None:
            sp.load_state_dict(pending)  # carries the original run's schedule
            self._follow_run_length(trainer, sp)
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
            _warn.warn(  # the same on every rank: once
                f"DynamicSparsity has seen {sp.step_count} optimizer steps but the Trainer is at global_step "
                f"{trainer.global_step}; the mask schedule follows its own count",
                stacklevel=2,
            )
        if self.config.verify_every:
            sp.check_ranks()

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
        fresh = sp.update_count != self._logged_updates
        # Between updates, log only when the Trainer writes logs (the figures change only at updates).
        every = trainer.log_every_n_steps
        due = every > 0 and (trainer.global_step % every == 0 or trainer.should_stop)
        if not (fresh or due):
            return
        self._logged_updates = sp.update_count
        self.log_statistics(pl_module, None if self.log_per_layer else lambda k: not k.startswith("sparsity/layer/"))

    # ------------------------------------------------------------------ state

    def _load_component_state(self, state: dict[str, Any]) -> None:
        # Loaded at on_train_start, once the optimizers are attached (Lightning restores callback
        # states after setup, before the optimizers of this fit exist).
        self._pending = dict(state)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _follow_run_length(trainer: pl.Trainer, sp: DynamicSparsifier) -> None:
        """A resumed run whose length differs from the checkpoint's: the schedule is recomputed from the
        saved config for the new length (the steps taken are kept), with a warning saying so."""
        total = trainer.estimated_stepping_batches
        old = sp.schedule
        if old is None or not math.isfinite(total) or int(total) == old.total_steps:
            return
        if int(total) <= sp.step_count:
            raise ValueError(
                f"DynamicSparsity: the checkpoint is at optimizer step {sp.step_count}, but this run ends at step "
                f"{int(total)}: raise the Trainer's max_steps / max_epochs to continue training"
            )
        sp.set_total_steps(int(total))
        _warn.warn(
            f"DynamicSparsity: the checkpoint's run had {old.total_steps} optimizer steps, this one has {int(total)}: "
            f"the mask schedule is recomputed for {int(total)} steps from the saved config (updates every "
            f"{sp.schedule.update_interval} steps until step {sp.schedule.end_step}, was {old.end_step}); the "
            f"{sp.step_count} steps taken are kept"
        )

    @classmethod
    def _gradients_read_before_step(cls, trainer: pl.Trainer) -> bool:
        """Whether something reads the gradients between the backward pass and the optimizer step
        that must see them masked: DeepSpeed, a DDP communication hook, or a callback that says so
        (``reads_gradients_before_step``, e.g. gradient compression)."""
        if trainer is None:  # setup() called by hand, to attach before fitting
            return False
        return (cls._is_deepspeed(trainer) or getattr(trainer.strategy, "_ddp_comm_hook", None) is not None
                or any(getattr(c, "reads_gradients_before_step", False) for c in trainer.callbacks))

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
            raise ValueError(
                f"DynamicSparsity: no optimizer of the Trainer holds the sparsified weights ({', '.join(sp.masks())}): "
                "`configure_optimizers` must return an optimizer over them"
            )
        if not all(isinstance(opt, torch.optim.Optimizer) for opt in holding):
            names = ", ".join(type(o).__name__ for o in holding)
            raise ValueError(f"DynamicSparsity needs torch.optim optimizers, got {names}")
        for i, opt in enumerate(holding):
            sp.attach_optimizer(opt, hook=i == 0)
