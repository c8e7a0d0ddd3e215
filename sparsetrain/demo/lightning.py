"""Lightning wrappers of the demo: the GPT language model, the MLP task and the data."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..moe.layer import MoE, moe_losses
from .data import CorpusConfig, make_datasets
from .mlp import MLPClassifier, make_classification
from .model import GPT, GPTConfig

__all__ = ["CharDataModule", "DemoLM", "MLPDataModule", "MLPTask"]


def _make_optimizer(params, name: str, lr: float, weight_decay: float, momentum: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise ValueError(f"`optimizer` must be 'adamw' or 'sgd', got {name!r}")


def _optimizer_with_warmup(task: pl.LightningModule):
    """``configure_optimizers`` of a task holding ``optimizer_name``, ``lr``, ``weight_decay``, ``momentum``
    and ``warmup_steps``: the optimizer, and a linear warm-up of the learning rate per step if asked."""
    opt = _make_optimizer(task.parameters(), task.optimizer_name, task.lr, task.weight_decay, task.momentum)
    if not task.warmup_steps:
        return opt
    w = task.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _check_optim_args(optimizer: str, lr: float, weight_decay: float, momentum: float) -> None:
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"`optimizer` must be 'adamw' or 'sgd', got {optimizer!r}")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum}")


def _check_moe_loss_coef(coef: float) -> None:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"`moe_loss_coef` must be a finite float >= 0, got {coef!r}")


def _has_moe(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a :class:`sparsetrain.moe.MoE` layer."""
    return any(isinstance(m, MoE) for m in model.modules())


class DemoLM(pl.LightningModule):
    """The demo GPT trained on next-byte prediction; logs ``train_loss`` and ``val_loss``.

    When the model holds MoE layers (:mod:`sparsetrain.moe`, e.g. after :func:`sparsetrain.moe.upcycle`),
    the training loss is ``lm_loss + moe_loss_coef * moe_losses(model)`` (each layer's aux and z loss,
    already scaled by its router's coefficients); ``train_lm_loss`` and ``train_moe_loss`` (the added
    term) are logged too. ``val_loss`` is the LM loss alone.
    """

    def __init__(
        self,
        model: GPTConfig | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        warmup_steps: int = 0,
        moe_loss_coef: float = 1.0,
    ) -> None:
        super().__init__()
        _check_optim_args(optimizer, lr, weight_decay, momentum)
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        _check_moe_loss_coef(moe_loss_coef)
        self.model = GPT(model or GPTConfig())
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay
        self.momentum, self.warmup_steps = momentum, warmup_steps
        self.moe_loss_coef = float(moe_loss_coef)

    def forward(self, idx):
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        loss = self.model.loss(*batch)
        if _has_moe(self.model):  # the router losses of every MoE layer (sparsetrain.moe, docs/moe.md)
            self.log("train_lm_loss", loss, sync_dist=False)
            moe = self.moe_loss_coef * moe_losses(self.model)
            self.log("train_moe_loss", moe, sync_dist=False)
            loss = loss + moe
        self.log("train_loss", loss, prog_bar=True, sync_dist=False)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.model.loss(*batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return _optimizer_with_warmup(self)


class MLPTask(pl.LightningModule):
    """The tiny MLP classifier; logs ``train_loss``, ``val_loss`` and ``val_acc``."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 128,
        n_classes: int = 8,
        optimizer: Literal["adamw", "sgd"] = "sgd",
        lr: float = 0.05,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        _check_optim_args(optimizer, lr, weight_decay, momentum)
        self.model = MLPClassifier(in_features, hidden, n_classes)
        self.optimizer_name, self.lr, self.weight_decay, self.momentum = optimizer, lr, weight_decay, momentum

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return _make_optimizer(self.parameters(), self.optimizer_name, self.lr, self.weight_decay, self.momentum)


class CharDataModule(pl.LightningDataModule):
    """The standard-library byte corpus as a data module (Lightning adds the DistributedSampler)."""

    def __init__(self, corpus: CorpusConfig | None = None, batch_size: int = 16, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        self.corpus = corpus or CorpusConfig()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = make_datasets(self.corpus)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class MLPDataModule(pl.LightningDataModule):
    """The synthetic classification task, split 7:1 into train and validation."""

    def __init__(self, n: int = 2048, in_features: int = 64, n_classes: int = 8, batch_size: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        full = make_classification(n, in_features, n_classes, seed)
        n_val = n // 8
        x, y = full.tensors
        self.train_set = TensorDataset(x[:-n_val], y[:-n_val])
        self.val_set = TensorDataset(x[-n_val:], y[-n_val:])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)
