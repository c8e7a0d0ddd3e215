"""MoEMonitor in a Lightning fit: statistics logged, biases updated once per optimizer step, state resumed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sparsetrain.callbacks import MoEMonitor
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain.moe import MoE, moe_losses


class _Task(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.moe = MoE(8, 16, 4, 2, bias_update_rate=1e-2, capacity_factor=1.0)
        self.head = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.head(x + self.moe(x)), y)
        return loss + moe_losses(self)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _Record(Callback):
    def __init__(self):
        self.logged = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(dict(trainer.callback_metrics))


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=8)


def _trainer(steps, cbs, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=cbs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, **kw)


def test_monitor_logs_and_updates_bias_per_optimizer_step():
    task, cb, rec = _Task(), MoEMonitor(), _Record()
    _trainer(4, [cb, rec], accumulate_grad_batches=2).fit(task, _loader())
    metrics = rec.logged[-1]
    for key in ("moe/moe/load_e0", "moe/moe/imbalance", "moe/moe/drop_rate", "moe/moe/aux_loss",
                "moe/moe/z_loss", "moe/moe/entropy", "moe/aux_loss", "moe/bias_range"):
        assert key in metrics, key
    assert metrics["moe/moe/imbalance"] >= 1.0
    state = cb.state_dict()
    assert state["num_steps"] == 4  # 8 micro-batches, 4 optimizer steps
    assert torch.equal(state["selection_bias"]["moe"], task.moe.router.selection_bias_E)
    assert state["selection_bias"]["moe"].abs().sum() > 0


def test_monitor_state_loads_before_setup():
    task, cb = _Task(), MoEMonitor()
    _trainer(2, [cb]).fit(task, _loader())
    state = cb.state_dict()
    cb2 = MoEMonitor()
    cb2.load_state_dict(state)
    task2 = _Task()
    cb2.setup(None, task2, "fit")
    assert cb2.balancer.num_steps == 2
    assert torch.equal(task2.moe.router.selection_bias_E, state["selection_bias"]["moe"])


def test_monitor_bad_arguments():
    with pytest.raises(ValueError, match="verify_every"):
        MoEMonitor(verify_every=-2)
    with pytest.raises(TypeError, match="nope"):
        MoEMonitor(nope=1)
