"""A sharded, seeded, resumable batch loader.

Lightning restarts an epoch's iteration from its first batch when it resumes mid-epoch,
unless the loader is stateful. This loader is: each epoch's order is a permutation
seeded by ``(seed, epoch)``, rank ``r`` of ``W`` takes every ``W``-th batch-sized slice
of it, and ``state_dict()`` records the epoch and the batches consumed so far, so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would have.

Consumption is counted by the trainer (``mark_consumed`` after each training batch),
not by the iterator, because Lightning fetches one batch ahead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

__all__ = ["ResumableLoader"]


class ResumableLoader:
    """Deterministic per-rank batches over ``dataset``; ``drop_last`` semantics.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per rank per batch.
        rank: this process's rank.
        world_size: number of ranks sharing the data.
        seed: base seed of the shuffling.
        shuffle: permute each epoch (otherwise sequential).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}")
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0
        self.consumed = 0
        self._started = False
        if len(self) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} samples is too small for {world_size} ranks x batch {batch_size}"
            )

    def __len__(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(n, generator=g)

    def __iter__(self):
        if self._started and self.consumed >= len(self):
            self.epoch += 1
            self.consumed = 0
        self._started = True
        order = self._order(self.epoch)
        span = self.batch_size * self.world_size
        for b in range(self.consumed, len(self)):
            start = b * span + self.rank * self.batch_size
            idx = order[start : start + self.batch_size].tolist()
            yield default_collate([self.dataset[i] for i in idx])

    def mark_consumed(self) -> None:
        """Count one batch as trained on (call after each training batch)."""
        self.consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._started = True
