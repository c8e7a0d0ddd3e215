"""Lightning adapter of :mod:`sparsetrain.compression`: top-k / DGC gradient compression under DDP."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from sparsetrain.compression import DGCConfig, DGCState, check_optimizer, dgc_hook

from ._base import DDPHookCallback

__all__ = ["GradientCompression"]


class GradientCompression(DDPHookCallback):
    """Compress DDP's gradient exchange with top-k sparsification, error feedback and DGC momentum correction.

    The callback builds a :class:`~sparsetrain.compression.DGCState`, registers
    :func:`~sparsetrain.compression.dgc_hook` on ``trainer.strategy.model`` (the DDP model)
    at the start of fitting, before the first backward (Lightning's own
    ``DDPStrategy(ddp_comm_hook=...)`` is ignored on CPU, so the callback does not rely on
    it), keeps the state in the Trainer's checkpoints (every rank's residuals and momenta,
    gathered on rank 0, which writes the checkpoint; each rank loads its own part, so a resumed
    run is bit-identical), and logs :meth:`~sparsetrain.compression.DGCState.statistics`.

    With ``momentum > 0`` the hook owns momentum (momentum correction): configure the
    optimizer with ``momentum=0``; an SGD with momentum is rejected at the start of fitting.

    Example::

        >>> # xdoctest: +SKIP("starts a multi-process run")
        >>> trainer = pl.Trainer(strategy="ddp", devices=2,
        ...                      callbacks=[GradientCompression(density=0.001, momentum=0.9)])

    Args are those of :class:`~sparsetrain.compression.DGCConfig`, plus:
        log_every_n_steps: log :meth:`~sparsetrain.compression.DGCState.statistics` every this
            many synced steps (0: never).
        fresh_state_ok: resuming from a checkpoint without this callback's state starts a fresh
            DGC state (warm-up from step 0, no residuals) with a warning; False (default): an error.

    Raises:
        ValueError: an option outside its range (at construction); a strategy other than DDP,
            an SGD with momentum while ``momentum > 0``, or a strategy already carrying a
            communication hook on CUDA (at the start of fitting).
    """

    config_class = DGCConfig
    _hook_purpose = "compresses DistributedDataParallel's gradient all-reduce"

    def __init__(self, *, log_every_n_steps: int = 1, fresh_state_ok: bool = False, **config_fields: Any) -> None:
        super().__init__(fresh_state_ok=fresh_state_ok, **self.split_kwargs(config_fields))
        self.config = DGCConfig(**config_fields)
        if not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 0:
            raise ValueError(f"`log_every_n_steps` must be an int >= 0, got {log_every_n_steps!r}")
        self.log_every_n_steps = log_every_n_steps
        self._logged_step = -1
        self._global_step = 0

    @property
    def state(self) -> DGCState | None:
        """The core :class:`~sparsetrain.compression.DGCState` (None before fitting starts)."""
        return self.component

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_strategy(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            check_optimizer(self.config, optimizer)
        model = self.ddp_model(trainer)
        if self.state is None:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            group = getattr(trainer.strategy, "process_group", None)
            self.component = DGCState(pl_module, self.config, process_group=group, grad_scaler=scaler)
            pending = self.take_pending()
            if pending is not None:
                self._load_component_state(pending)
        self._global_step = trainer.global_step
        self.register_hook(model, dgc_hook)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        state = self.state
        if state is None:
            return
        if trainer.global_step != self._global_step:  # an optimizer step was taken
            self._global_step = trainer.global_step
            state.step()
        if not self.log_every_n_steps or not state.step_count:
            return
        step = state.step_count - 1  # the synced step just taken
        if step == self._logged_step or step % self.log_every_n_steps:
            return
        self._logged_step = step
        pl_module.log_dict(state.statistics(), on_step=True, on_epoch=False, prog_bar=False, sync_dist=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals for the run's ``summary.json`` (from :meth:`DGCState.statistics`)."""
        if self.state is None:
            return {}
        stats = self.state.statistics()
        return {
            "density": self.config.density,
            "steps": int(stats["compression/total_steps"]),
            "wire_bytes": stats["compression/total_wire_bytes"],
            "dense_wire_bytes": stats["compression/total_dense_wire_bytes"],
            "ratio": stats["compression/total_ratio"],
            "compress_s": stats["compression/total_compress_s"],
            "last": {k.removeprefix("compression/"): v for k, v in stats.items() if "/total_" not in k},
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Every rank's DGC state, gathered on rank 0 (a collective: Lightning calls it on all ranks when
        checkpointing, and rank 0 writes the file)."""
        if self.component is None:
            return super().state_dict()
        return self.component.full_state_dict()

    def _load_component_state(self, state: dict[str, Any]) -> None:
        self.component.load_full_state_dict(state)
