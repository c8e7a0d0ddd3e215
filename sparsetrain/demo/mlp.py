"""A tiny MLP classifier on a fixed synthetic task, for fast unit tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["MLPClassifier", "make_classification"]


class MLPClassifier(nn.Module):
    """``in_features -> hidden -> hidden -> n_classes`` with ReLU; widths multiples of 64 by default."""

    def __init__(self, in_features: int = 64, hidden: int = 128, n_classes: int = 8) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("hidden", hidden), ("n_classes", n_classes)):
            if v < 1:
                raise ValueError(f"`{name}` must be >= 1, got {v}")
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_classification(
    n: int = 2048, in_features: int = 64, n_classes: int = 8, seed: int = 0
) -> TensorDataset:
    """Gaussian blobs around fixed random class centres; the same data for a seed."""
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, in_features, generator=g) * 2.0
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, in_features, generator=g)
    return TensorDataset(x, y)
