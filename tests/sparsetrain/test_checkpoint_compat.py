"""Checkpoints written by the first release (state version 1) still load, and a run resumed from them
continues exactly as that release's uninterrupted run did (``tests/data/release1/``, made by
``tests/data/make_release1_checkpoints.py`` with that release installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.data.make_release1_checkpoints import STEPS, UserNet, batch
from tests.harness import run_distributed

DATA = Path(__file__).resolve().parents[1] / "data" / "release1"


def _resume(rank, world, name):
    from sparsetrain.compression import DGCState
    from sparsetrain.nm import NMSparsifier
    from sparsetrain.sparsity import DynamicSparsifier

    saved = torch.load(DATA / f"{name}_rank{rank}.pt", weights_only=True)
    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    model = UserNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    parts = {}
    if name == "dgc":
        ddp = DDP(model)
        parts["dgc"] = DGCState(model, density=0.1, warmup_steps=2, ramp_steps=0, momentum=0.9, min_numel=16)
        parts["dgc"].register(ddp)
    else:
        parts["nm"] = NMSparsifier(model, n=2, m=4, method="srste", include=["mid"], optimizer=opt)
        parts["dynamic"] = DynamicSparsifier(model, method="set", sparsity=0.5, update_every=2, include=["body"],
                                             seed=3, total_steps=12, optimizer=opt)
        ddp = DDP(model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    for step in range(STEPS, 2 * STEPS):
        x, y = batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    final = saved["final_model"]
    return [k for k, v in model.state_dict().items() if not torch.equal(v, final[k])]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dgc", "sparsity"])
def test_release1_core_states_resume_exactly(name):
    for differing in run_distributed(_resume, 2, name, timeout=200):
        assert differing == []


def test_release1_lightning_checkpoint_states_load():
    """The callbacks' states, saved under the class names, load into today's components."""
    from sparsetrain.sparsity import DynamicSparsifier

    ckpt = torch.load(DATA / "lightning.ckpt", weights_only=True)
    state = ckpt["callbacks"]["DynamicSparsity"]
    model = nn.Module()
    model.net = UserNet()
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=2, include=["net.body", "net.mid"],
                           total_steps=STEPS)
    model.load_state_dict(ckpt["state_dict"])
    sp.load_state_dict(state)
    assert sp.step_count == STEPS
    for name, mask in sp.masks().items():
        assert torch.equal(mask, ckpt["state_dict"][name.removesuffix("weight") + "weight_mask"])
        assert not (model.get_parameter(name)[~mask] != 0).any()
    dgc = ckpt["callbacks"]["GradientCompression"]
    assert dgc["version"] == 1 and len(dgc["ranks"]) == 2
