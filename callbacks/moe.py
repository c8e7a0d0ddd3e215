"""Lightning callback for MoE models: a thin adapter over :class:`sparsetrain.moe.MoEBalancer`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from sparsetrain.moe import MoEBalancer, MoEBalancerConfig

from ._base import ComponentCallback

__all__ = ["MoEMonitor"]


class MoEMonitor(ComponentCallback):
    """Log every MoE layer's routing and keep the selection biases balanced and identical on every rank.

    At ``setup`` the callback attaches a :class:`~sparsetrain.moe.MoEBalancer` to the LightningModule;
    before every optimizer step it updates the aux-loss-free selection biases (for layers that use one,
    from the loads of all micro-batches of the step summed over the ranks); after the step it logs,
    every ``log_every_n_steps``, per layer ``moe/<layer>/load_e<i>`` (expert load before capacity),
    ``imbalance`` (max/mean load), ``drop_rate``, ``token_drop_rate``, ``aux_loss``, ``z_loss`` and
    ``entropy`` (router entropy), and over all layers ``moe/aux_loss``, ``moe/z_loss``, ``moe/drop_rate``,
    ``moe/imbalance``, ``moe/bias_range``. The figures are those of the step's last micro-batch. The
    run's ``report.png`` draws the expert loads over time.

    The router losses reach the training loss only if the LightningModule adds them: ``loss = lm_loss +
    sparsetrain.moe.moe_losses(self)`` (docs/moe.md).

    Args:
        update_every: move the selection biases every this many optimizer steps (the loads counted over
            those steps; 1, DeepSeek-V3's choice, by default).
        verify_every: check that the selection biases agree on every rank every this many optimizer
            steps (0: never).
        log_stats: log the statistics.

    Example::

        trainer = pl.Trainer(callbacks=[MoEMonitor()])
    """

    config_class = MoEBalancerConfig

    def __init__(self, *, log_stats: bool = True, **config_fields: Any) -> None:
        config_fields = self.split_kwargs(config_fields)
        super().__init__(**config_fields)
        self._config = MoEBalancerConfig(**config_fields)
        self.log_stats = log_stats
        self._logged_step = -1

    @property
    def balancer(self) -> MoEBalancer | None:
        """The core :class:`~sparsetrain.moe.MoEBalancer` (None before ``setup``)."""
        return self.component

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.component is not None:
            return
        self.component = MoEBalancer(pl_module, self._config)
        pending = self.take_pending()
        if pending:
            self.component.load_state_dict(pending)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.component is not None:
            self.component.step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.component is None or not self.log_stats or step == self._logged_step:
            return
        if self.logging_due(trainer):
            self._logged_step = step
            self.log_statistics(pl_module)
