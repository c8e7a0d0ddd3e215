"""Gradient compression (DGC top-k) with MoE experts, on 2 gloo ranks: the stacked ``[E, ...]`` expert
weights are selected per expert slice, as E separate layers would be, against a straightforward reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sparsetrain.compression import DGCState
from sparsetrain.compression.topk import num_selected
from sparsetrain.moe import MoE
from tests.harness import run_distributed

D, FH, E = 16, 24, 4
CFG = dict(density=0.05, warmup_steps=2, ramp_steps=0, momentum=0.0, selection="topk", value_dtype="fp32",
           cost_rule=False, min_numel=1, verify_every=0)


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D, D), MoE(D, FH, E, 2, activation="gelu", bias=True, dropless=True))
    with torch.no_grad():  # expert 0's gradients dwarf the others': a top-k over the whole stack would take
        for p in net[1].experts.parameters():  # (nearly) all its entries from expert 0
            p[0].mul_(5.0)
    return net


def _tokens(rank):
    return torch.randn(12, D, generator=torch.Generator().manual_seed(40 + rank))


def _local_grads(rank):
    net = _net()
    net(_tokens(rank)).square().sum().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _topk(g, k):
    flat = g.reshape(-1)
    out = torch.zeros_like(flat)
    idx = flat.abs().topk(k).indices
    out[idx] = flat[idx]
    return out.view_as(g)


def _sent(name, g, per_expert):
    """What one rank contributes for one parameter under the plan: top-k of every tensor of >= 2
    dimensions (of every expert slice when ``per_expert``), other tensors whole."""
    stacked = per_expert and ".experts." in name
    if stacked:
        return torch.stack([_sent(name, g[e], False) if g[e].dim() >= 2 else g[e] for e in range(g.shape[0])])
    if g.dim() < 2:
        return g
    return _topk(g, num_selected(g.numel(), CFG["density"]))


def _worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _net()
    ddp = DDP(net)
    state = DGCState(**CFG).register(ddp)
    for _ in range(CFG["warmup_steps"] + 1):  # dense warm-up steps (DDP rebuilds its buckets), then compressed
        net.zero_grad()
        ddp(_tokens(rank)).square().sum().backward()
    dist.barrier()
    return {"grads": {n: p.grad.clone() for n, p in net.named_parameters()},
            "residual_keys": sorted(state.state_dict()["residuals"])}


@pytest.mark.slow
def test_compression_selects_per_expert_slice():
    world = 2
    results = run_distributed(_worker, world)
    local = [_local_grads(r) for r in range(world)]
    for name in local[0]:
        want = sum(_sent(name, g[name], True) for g in local) / world
        for rank in range(world):
            got = results[rank]["grads"][name]
            assert torch.equal(got != 0, want != 0), name  # the same entries selected
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    # every expert got its share: k entries of each of its weight matrices per rank, not expert 0 all of them
    w1 = results[0]["grads"]["1.experts.w1_EFD"]
    k = num_selected(FH * D, CFG["density"])
    for e in range(E):
        assert 0 < int((w1[e] != 0).sum()) <= world * k
    whole = sum(_topk(g["1.experts.w1_EFD"], k * E) for g in local)
    assert int((whole[1:] != 0).sum()) < int((w1[1:] != 0).sum())  # the whole-stack top-k starves experts 1..3
    # the residuals are keyed per expert slice, like E separate layers
    assert "1.experts.w1_EFD.3" in results[0]["residual_keys"] and "1.experts.w1_EFD" not in results[0]["residual_keys"]
