"""Models and data of a hypothetical user, named in recipes by ``class_path``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TwoTower(nn.Module):
    """Not one of ours: two branches summed, a GELU, a head; Linear layers whose widths divide 2:4."""

    def __init__(self, features: int = 64, width: int = 32, classes: int = 8) -> None:
        super().__init__()
        self.left = nn.Linear(features, width)
        self.right = nn.Sequential(nn.Linear(features, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(nn.functional.gelu(self.left(x) + self.right(x)))


class TowerTask(pl.LightningModule):
    """A LightningModule with its own loss and optimizer."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = TwoTower(width=width)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Blobs(pl.LightningDataModule):
    """Gaussian blobs with plain DataLoaders (Lightning adds the DistributedSampler)."""

    def __init__(self, n: int = 512, features: int = 64, classes: int = 8, batch_size: int = 16,
                 seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, features, generator=g) * 2
        y = torch.randint(0, classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, features, generator=g)
        n_val = n // 8
        self.train_set = TensorDataset(x[n_val:], y[n_val:])
        self.val_set = TensorDataset(x[:n_val], y[:n_val])
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


class NotAModel:
    """A class that is neither an nn.Module nor a data module."""
