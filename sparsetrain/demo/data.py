"""A character-level corpus built from the running Python's standard-library sources.

Real text that nobody here wrote, present on every machine, no download. Tokens are
bytes (vocabulary 256). The file list is sorted and cut at a fixed byte budget, so the
corpus is deterministic for a given Python installation; the last ``val_fraction`` of
it is the validation split.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["VOCAB_SIZE", "CharDataset", "CorpusConfig", "load_corpus", "make_datasets", "stdlib_files"]

VOCAB_SIZE = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


@dataclass(kw_only=True, frozen=True)
class CorpusConfig:
    """How much of the standard library to read and how to split it.

    Args:
        byte_budget: bytes of source to read, in sorted file order.
        block_size: tokens per training example (the model's context length).
        val_fraction: tail fraction of the corpus used for validation.
    """

    byte_budget: int = 2_000_000
    block_size: int = 128
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.byte_budget < 10_000:
            raise ValueError(f"`byte_budget` must be >= 10000, got {self.byte_budget}")
        if self.block_size < 2:
            raise ValueError(f"`block_size` must be >= 2, got {self.block_size}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"`val_fraction` must be in (0, 0.5), got {self.val_fraction}")


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in sorted order (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@lru_cache(maxsize=4)
def load_corpus(byte_budget: int) -> bytes:
    """The first ``byte_budget`` bytes of the concatenated standard-library sources."""
    chunks, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= byte_budget:
            break
    corpus = b"".join(chunks)[:byte_budget]
    if len(corpus) < byte_budget:
        raise RuntimeError(f"the standard library holds only {len(corpus)} bytes of source")
    return corpus


class CharDataset(Dataset):
    """Non-overlapping windows of ``block_size + 1`` bytes: input and next-byte targets."""

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if data.dim() != 1 or data.numel() < block_size + 1:
            raise ValueError(f"`data` must be 1-D with more than {block_size} tokens, got {tuple(data.shape)}")
        self.data = data
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def make_datasets(config: CorpusConfig | None = None) -> tuple[CharDataset, CharDataset]:
    """Train and validation datasets over the standard-library corpus."""
    config = config or CorpusConfig()
    corpus = torch.frombuffer(bytearray(load_corpus(config.byte_budget)), dtype=torch.uint8)
    n_val = int(corpus.numel() * config.val_fraction)
    return CharDataset(corpus[:-n_val], config.block_size), CharDataset(corpus[-n_val:], config.block_size)
