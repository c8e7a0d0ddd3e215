"""Lightning adapter of :mod:`sparsetrain.compression.masked`: DDP exchanges only the gradients inside the masks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from sparsetrain.compression.masked import MaskedExchange as _Exchange
from sparsetrain.compression.masked import MaskedExchangeConfig, masked_hook

from ._base import DDPHookCallback

__all__ = ["MaskedExchange"]


class MaskedExchange(DDPHookCallback):
    """All-reduce only the gradient entries inside the masks of the sparsity on the same Trainer.

    Put it next to :class:`~sparsetrain.callbacks.DynamicSparsity`: the callback builds a
    :class:`sparsetrain.compression.masked.MaskedExchange` on the LightningModule and registers
    :func:`~sparsetrain.compression.masked.masked_hook` on ``trainer.strategy.model`` (the DDP
    model) at the start of fitting (itself: Lightning ignores ``DDPStrategy(ddp_comm_hook=...)`` on
    CPU). The exchange finds the masks through the model (``contract.gradient_masks``), so no
    other wiring is needed; the result is the dense all-reduce's (bit for bit on 2 ranks). It logs
    ``exchange/payload_bytes``, ``exchange/dense_payload_bytes``, ``exchange/packed_fraction`` and
    ``exchange/mask_version`` (and the other keys of
    :meth:`~sparsetrain.compression.masked.MaskedExchange.statistics`) every
    ``trainer.log_every_n_steps`` optimizer steps.

    Example::

        >>> # xdoctest: +SKIP("starts a multi-process run")
        >>> trainer = pl.Trainer(strategy="ddp", devices=2,
        ...                      callbacks=[DynamicSparsity(method="rigl", sparsity=0.9), MaskedExchange()])

    Args:
        verify_every: every this many optimizer steps, check that the ranks pack alike; 0: never.
        inactive_density: on RigL's update steps with ``grad_masking="step"``, send only this share
            of the entries outside the masks (the largest per weight and rank) instead of the whole
            bucket (:class:`~sparsetrain.compression.masked.MaskedExchangeConfig`); None: whole.
        skip_idle_experts: leave the stacked weights of MoE experts without tokens on every rank
            out of the exchange (lossless).

    Raises:
        ValueError: a bad option (at construction); a strategy other than DDP, or another
            communication hook on the DDP model (at the start of fitting).
    """

    def __init__(self, *, verify_every: int = 0, inactive_density: float | None = None,
                 skip_idle_experts: bool = True) -> None:
        super().__init__()
        self.config = MaskedExchangeConfig(verify_every=verify_every, inactive_density=inactive_density,
                                           skip_idle_experts=skip_idle_experts)
        self.verify_every = verify_every
        self._global_step = 0

    @property
    def exchange(self) -> _Exchange | None:
        """The core exchange (None before fitting starts)."""
        return self.component

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_strategy(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.ddp_model(trainer)
        if self.component is None:
            group = getattr(trainer.strategy, "process_group", None)
            self.component = _Exchange(pl_module, self.config, process_group=group)
            pending = self.take_pending()
            if pending is not None:
                self.component.load_state_dict(pending)
        self._global_step = trainer.global_step
        self.register_hook(model, masked_hook)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.component is None or trainer.global_step == self._global_step:
            return
        self._global_step = trainer.global_step
        self.component.step()
        if self.logging_due(trainer):
            self.log_statistics(pl_module)

    def summary(self) -> dict[str, Any]:
        """JSON-ready totals for ``summary.json``."""
        if self.component is None:
            return {}
        stats = self.component.statistics()
        dense = stats["exchange/total_dense_payload_bytes"]
        return {
            "steps": int(stats["exchange/total_steps"]),
            "payload_bytes": stats["exchange/total_payload_bytes"],
            "dense_payload_bytes": dense,
            "packed_fraction": stats["exchange/total_payload_bytes"] / dense if dense else 1.0,
            "dense_steps": int(stats["exchange/total_dense_steps"]),
        }
