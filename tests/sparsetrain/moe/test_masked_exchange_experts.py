"""The masked (sparsity-aware) exchange with MoE expert stacks under DynamicSparsity, on 2 gloo ranks.

``contract.gradient_masks`` gives each stack's ``[E, ...]`` mask under its parameter name, the exchange
packs the stack by it like any other masked weight (3-D masks flattened in the parameter's order), and the
run is bit-identical to DDP's dense all-reduce (2 ranks: a sum of two terms has one order), weights, masks
and optimizer state at every step, while the packed vector is the masks' share of the gradient. With
``compression=``, every expert slice is a tensor of its own for the engine (top-k, residual and momentum per
slice, carried across mask changes slice by slice).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression.dgc import STACKED_ATTR
from sparsetrain.compression.masked import MaskedExchange
from sparsetrain.compression.topk import num_selected
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


# ---------------------------------------------------------------------- with compression: per-expert top-k

CFG = dict(density=0.05, warmup_steps=2, ramp_steps=0, momentum=0.0, selection="topk", value_dtype="fp32",
           cost_rule=False, min_numel=1, verify_every=0)


def _sparse_net():
    """The user model with static masks on the expert stacks; expert 0's weights 5x the others', so its
    gradients dwarf theirs (a top-k over the whole packed stack would take nearly all its entries there)."""
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.moe.experts.parameters():
            p[0].mul_(5.0)
    sp = DynamicSparsifier(model, method="static", sparsity=0.8, include=["*.experts.w*"], total_steps=10)
    return model, sp


def _local_grads(rank):
    model, sp = _sparse_net()
    x, y = _batch(rank, 0)
    nn.functional.cross_entropy(model(x), y).backward()  # the sparsifier's hooks mask the stacks' gradients
    return ({n: p.grad.clone() for n, p in model.named_parameters()}, {n: m.clone() for n, m in sp.masks().items()},
            {n: bool(getattr(p, STACKED_ATTR, False)) for n, p in model.named_parameters()})


def _topk_packed(g, mask):
    """One rank's contribution for one tensor: the top-k (k = num_selected of its size) of its entries inside
    ``mask`` (every entry when None), scattered back; tensors of fewer than 2 dimensions whole."""
    if mask is None and g.dim() < 2:
        return g
    flat, keep = g.reshape(-1), (torch.ones_like(g, dtype=torch.bool) if mask is None else mask).reshape(-1)
    pos = keep.nonzero().squeeze(1)
    packed = flat[pos]
    out = torch.zeros_like(flat)
    idx = packed.abs().topk(num_selected(packed.numel(), CFG["density"])).indices
    out[pos[idx]] = packed[idx]
    return out.view_as(g)


def _sent(g, mask, stacked):
    if stacked:  # every expert slice on its own
        return torch.stack([_topk_packed(g[e], None if mask is None else mask[e]) for e in range(g.shape[0])])
    return _topk_packed(g, mask)


def _compressed_worker(rank, world):
    model, sp = _sparse_net()
    ddp = DDP(model)
    ex = MaskedExchange(model, compression=CFG, skip_idle_experts=False).register(ddp)
    x, y = _batch(rank, 0)
    for _ in range(CFG["warmup_steps"] + 1):  # dense warm-up (DDP rebuilds its buckets), then compressed
        model.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
    comp = ex.state_dict()["compression"]
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "residuals": sorted(comp["residuals"]), "positions": sorted(comp["positions"])}


@pytest.mark.slow
def test_compressed_masked_exchange_selects_per_expert_slice():
    world = 2
    results = run_distributed(_compressed_worker, world, timeout=240)
    local = [_local_grads(r) for r in range(world)]
    grads0, masks, stacked = local[0]
    for name in grads0:
        mask = masks.get(name)  # the stacks' (by parameter name); the other parameters are dense
        want = sum(_sent(g[name], mask, stacked[name]) for g, _, _ in local) / world
        for rank in range(world):
            got = results[rank]["grads"][name]
            assert torch.equal(got != 0, want != 0), name  # the same entries selected
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=lambda m, n=name: f"{n}: {m}")
            if mask is not None:
                assert not got[~mask].any(), name
    # every expert got its share of w1, not expert 0 all of it; state keyed per slice
    w1, m1 = results[0]["grads"][STACKS[0]], masks[STACKS[0]]
    for e in range(E):
        k = num_selected(int(m1[e].sum()), CFG["density"])
        assert 0 < int((w1[e] != 0).sum()) <= world * k
    whole = sum(_topk_packed(g[STACKS[0]], m1) for g, _, _ in local)  # one top-k over the packed stack
    assert int((whole[1:] != 0).sum()) < int((w1[1:] != 0).sum())
    for key in ("residuals", "positions"):
        assert f"{STACKS[0]}.3" in results[0][key] and STACKS[0] not in results[0][key]


def _exchange(ex, w):
    """One exchange of a zero gradient on one rank (the collectives of one rank are the identity)."""
    message = ex.prepare([w], torch.zeros(w.numel()), 1)
    ex.end_step()
    ex.finish(message, [t for _, t in message.parts])


def test_per_slice_residuals_outside_the_masks_never_revive():
    """One process, the exchange driven by hand: the engine state of slice e follows slice e's mask (kept
    positions keep their residual, a dropped one loses it, a regrown one starts at 0), each slice sends its own
    top-k, and the state saved by slice name loads into a new exchange."""
    torch.manual_seed(0)
    model = Net()
    sp = DynamicSparsifier(model, method="static", sparsity=0.8, include=["*.experts.w1_EFD"], total_steps=10)
    ex = MaskedExchange(model, compression=CFG)
    w, S = model.moe.experts.w1_EFD, STACKS[0]
    for _ in range(CFG["warmup_steps"]):
        _exchange(ex, w)
    mask = sp.masks()[S].clone()
    i = int(mask[1].flatten().nonzero()[0])  # a position of expert 1 that is dropped, then grown back
    j = int((~mask[1].flatten()).nonzero()[0])

    def set_residuals(m):
        ex.engine.residuals = {f"{S}.{e}": torch.arange(1.0, int(m[e].sum()) + 1) for e in range(E)}

    def expected(old_m, new_m):
        """Residuals after one exchange of a zero gradient: carried to the new positions, then every slice's
        top-k sent (and cleared)."""
        out = {}
        for e in range(E):
            old_pos, new_pos = old_m[e].flatten().nonzero().squeeze(1), new_m[e].flatten().nonzero().squeeze(1)
            flat = torch.zeros(old_m[e].numel())
            flat[old_pos] = ex.engine.residuals[f"{S}.{e}"]
            r = flat[new_pos]
            r[r.abs().topk(num_selected(r.numel(), CFG["density"])).indices] = 0.0
            out[f"{S}.{e}"] = r
        return out

    set_residuals(mask)
    state = model.state_dict()
    dropped = mask.clone()
    dropped[1].view(-1)[i], dropped[1].view(-1)[j] = False, True
    want = expected(mask, dropped)
    model.load_state_dict({**state, f"{S}_mask": dropped})  # a mask change (a new mask version)
    _exchange(ex, w)
    for k, v in want.items():
        assert torch.equal(ex.engine.residuals[k], v), k
    set_residuals(dropped)
    regrown = mask
    want = expected(dropped, regrown)
    model.load_state_dict({**state, f"{S}_mask": regrown})
    _exchange(ex, w)
    for k, v in want.items():
        assert torch.equal(ex.engine.residuals[k], v), k
    at_i = int(regrown[1].flatten()[:i].sum())  # i's place in expert 1's packing
    assert ex.engine.residuals[f"{S}.1"][at_i] == 0.0  # its residual before the drop is gone
    saved = ex.state_dict()
    assert sorted(saved["compression"]["residuals"]) == [f"{S}.{e}" for e in range(E)]
    fresh = MaskedExchange(model, compression=CFG)
    fresh.load_state_dict(saved)
    for k, v in ex.engine.residuals.items():
        assert torch.equal(fresh.engine.residuals[k], v)
