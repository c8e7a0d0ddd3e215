"""The masked (sparsity-aware) exchange with MoE expert stacks under DynamicSparsity, on 2 gloo ranks.

``contract.gradient_masks`` gives each stack's ``[E, ...]`` mask under its parameter name, the exchange
packs the stack by it like any other masked weight (3-D masks flattened in the parameter's order), and the
run is bit-identical to DDP's dense all-reduce (2 ranks: a sum of two terms has one order), weights, masks
and optimizer state at every step, while the packed vector is the masks' share of the gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression.masked import MaskedExchange
from sparsetrain.sparsity import DynamicSparsifier
from tests.harness import run_distributed
from tests.sparsetrain.moe.test_dynamic_experts import STACKS, D, E, F, Net

STEPS = 6


def _batch(rank: int, t: int):
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g)


def _run(rank: int, world: int, mode: str, grad_masking: str) -> dict:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=2, end_fraction=1.0, total_steps=STEPS,
                           include=["*.experts.w*", "head"], optimizer=opt, grad_masking=grad_masking,
                           verify_every=1)
    ddp = DDP(model, bucket_cap_mb=0.004)  # a few buckets
    ex = MaskedExchange(model, optimizer=opt, skip_idle_experts=False).register(ddp) if mode == "masked" else None
    _, gmasks = contract.gradient_masks(model)
    shapes = {n: tuple(gmasks[n].shape) for n in STACKS}
    params = dict(model.named_parameters())
    snaps, stats, expected = [], [], []
    initial = {n: m.clone() for n, m in sp.masks().items()}
    for t in range(STEPS):
        masks = sp.masks()
        total = sum(p.numel() for p in params.values())
        sent = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
        expected.append(sent / total)
        x, y = _batch(rank, t)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        state = {f"{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()
                 if isinstance(v, torch.Tensor)}
        snaps.append(({n: p.detach().clone() for n, p in params.items()},
                      {n: m.clone() for n, m in sp.masks().items()}, state))
        if ex is not None:
            stats.append(ex.statistics())
    return {"snaps": snaps, "stats": stats, "expected": expected, "shapes": shapes, "updates": sp.update_count,
            "initial": initial}


@pytest.mark.parametrize("grad_masking", ["hook", "step"])
def test_masked_exchange_of_expert_stacks_is_bit_identical_to_dense(grad_masking):
    got = run_distributed(_run, 2, "masked", grad_masking, timeout=240)
    want = run_distributed(_run, 2, "dense", grad_masking, timeout=240)
    for rank in range(2):
        g, w = got[rank], want[rank]
        assert g["shapes"] == {STACKS[0]: (E, F, D), STACKS[1]: (E, D, F), STACKS[2]: (E, F, D)}
        assert g["updates"] == w["updates"] >= 2
        for t in range(STEPS):
            for part_g, part_w in zip(g["snaps"][t], w["snaps"][t]):
                assert part_g.keys() == part_w.keys()
                for k in part_g:
                    assert torch.equal(part_g[k], part_w[k]), (rank, t, k)
            stats = g["stats"][t]
            if stats["exchange/dense_step"] == 1.0:  # grad_masking="step" before a RigL update: sent whole
                assert grad_masking == "step" and stats["exchange/packed_fraction"] == 1.0
            else:
                assert stats["exchange/packed_fraction"] == pytest.approx(g["expected"][t], rel=1e-6)
                assert stats["exchange/packed_fraction"] < 0.5
    # the masks moved (RigL) and are identical on both ranks
    final = [got[r]["snaps"][-1][1] for r in range(2)]
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
    assert all(not torch.equal(final[0][n], got[0]["initial"][n]) for n in STACKS)
