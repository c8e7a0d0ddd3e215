"""The tiny demo LM, its data and a quiet CPU Trainer, shared by the callback tests that train it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sparsetrain.demo import GPTConfig
from sparsetrain.demo.lightning import DemoLM
from tests.harness import single_thread

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)


@pytest.fixture(autouse=True)
def one_thread():
    """Import it into a test module to run that module's tests on one intra-op thread."""
    with single_thread():
        yield


def loader(n_batches=8, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n_batches * batch, CFG.block_size + 1), generator=g)
    return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=batch, shuffle=False)


def trainer(max_steps, callbacks, tmp_path=None, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks, logger=False,
                      enable_checkpointing=tmp_path is not None, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=tmp_path, deterministic=True, **kw)


def module(seed=0):
    torch.manual_seed(seed)
    return DemoLM(model=CFG, lr=1e-2)
