"""The masked exchange's options, on 2 gloo ranks, against straightforward references.

- ``inactive_density``: on RigL's update steps (``grad_masking="step"``: RigL reads the gradient
  the exchange delivers) the entries inside the masks travel exactly and, per masked weight and
  rank, only the top-k of the entries outside. The run is bit-identical to one whose DDP hook
  computes that gradient naively (all-gather of the whole local gradients, a stable sort per rank);
  RigL grows where the exchange delivered gradient (elsewhere only once those are all grown).
- ``skip_idle_experts``: an MoE layer with one expert that gets no token on either rank and one that
  gets tokens on one rank only: that first expert is left out of the packed vector, the run is
  bit-identical to DDP's dense all-reduce.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain.compression.masked import MaskedExchange, MaskedExchangeConfig, masked_hook
from sparsetrain.moe import MoE
from sparsetrain.sparsity import DynamicSparsifier
from tests.harness import run_distributed
from tests.sparsetrain.compression.test_masked import STEPS, UPDATE_EVERY, _assert_equal, _batch, _model, _snapshot

DENSITY = 0.2  # of the entries outside each mask, per rank


def _reference_hook(sp: DynamicSparsifier, names: dict[int, str], density: float):
    """Dense steps: the active entries averaged, and per masked weight and rank the ceil(density * n_out)
    entries outside the mask of largest |g| (equal magnitudes: the lower position), summed / W."""
    def hook(_, bucket):
        buffer = bucket.buffer()
        world = dist.get_world_size()
        if not sp.needs_dense_gradient():
            buffer.div_(world)
            dist.all_reduce(buffer)
        else:
            local = [torch.empty_like(buffer) for _ in range(world)]
            dist.all_gather(local, buffer)
            out, offset = torch.zeros_like(buffer), 0
            masks = sp.masks()
            for p in bucket.parameters():
                n, name = p.numel(), names[id(p)]
                parts = [g[offset:offset + n] for g in local]
                mask = masks[name].reshape(-1) if name in masks else torch.ones(n, dtype=torch.bool)
                res = out[offset:offset + n]
                res[mask] = parts[0][mask] / world + parts[1][mask] / world
                outside = (~mask).nonzero().squeeze(1)
                if outside.numel():
                    k = min(outside.numel(), max(1, -(-int(density * outside.numel() * 1e6) // 10**6)))
                    for g in parts:
                        order = torch.sort(-g[outside].abs(), stable=True).indices[:k]
                        res[outside[order]] += g[outside[order]] / world
                offset += n
            buffer.copy_(out)
        fut = torch.futures.Future()
        fut.set_result(buffer)
        return fut

    return hook


def _run_inactive(rank: int, world: int, mode: str) -> dict:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=UPDATE_EVERY, end_fraction=1.0,
                           total_steps=STEPS, optimizer=opt, grad_masking="step", verify_every=0)
    ddp = DDP(model, bucket_cap_mb=0.005)
    names = {id(p): n for n, p in model.named_parameters()}
    exchanged, grown, ex = [], [], None
    if mode == "inactive":
        ex = MaskedExchange(model, optimizer=opt, inactive_density=DENSITY)

        def recorded(state, bucket):
            dense = sp.needs_dense_gradient()
            params = list(bucket.parameters())

            def keep(f):
                if dense:
                    off = 0
                    for p in params:
                        exchanged[-1][names[id(p)]] = f.value()[off:off + p.numel()].view_as(p).clone()
                        off += p.numel()
                return f.value()

            return masked_hook(state, bucket).then(keep)

        ddp.register_comm_hook(ex, recorded)
    else:
        ddp.register_comm_hook(None, _reference_hook(sp, names, DENSITY))
    snaps, stats = [], []
    for t in range(STEPS):
        exchanged.append({})
        before = {n: m.clone() for n, m in sp.masks().items()}
        x, y = _batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        snaps.append(_snapshot(model, opt, sp))
        grown.append({n: (m & ~before[n], ~before[n]) for n, m in sp.masks().items()})
        if ex is not None:
            stats.append(ex.statistics())
    return {"snaps": snaps, "exchanged": exchanged, "grown": grown, "stats": stats, "updates": sp.update_count}


@pytest.mark.slow
def test_inactive_topk_on_rigl_update_steps_equals_the_reference() -> None:
    got = run_distributed(_run_inactive, 2, "inactive", timeout=240)
    want = run_distributed(_run_inactive, 2, "reference", timeout=240)
    for rank in range(2):
        assert got[rank]["updates"] == want[rank]["updates"] >= 3
        for t in range(STEPS):
            _assert_equal(got[rank]["snaps"][t], want[rank]["snaps"][t])
        updates = 0
        for t in range(STEPS):
            stats, exchanged = got[rank]["stats"][t], got[rank]["exchanged"][t]
            assert bool(exchanged) == (stats["exchange/dense_step"] == 1.0)
            if not exchanged:
                continue
            updates += 1
            # the dense step sent the active part and about DENSITY of the outside entries per rank
            assert 0.5 * DENSITY < stats["exchange/inactive_sent_fraction"] < 1.5 * DENSITY
            assert stats["exchange/packed_fraction"] < 0.6
            from_sent = 0
            for name, (g, outside) in got[rank]["grown"][t].items():
                sent = (exchanged[name] != 0) & outside
                # RigL ranks the exchanged gradient: it grows where some rank sent gradient, and grows where
                # none did only once every such position is taken
                assert bool((exchanged[name][g] != 0).all()) or bool(g[sent].all()), (t, name)
                from_sent += int((g & sent).sum())
            assert from_sent > 0
        assert updates == got[rank]["updates"]


def _moe_model() -> nn.Module:
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, k=1, dropless=True, aux_loss_coef=0.0, z_loss_coef=0.0)
    with torch.no_grad():  # expert e takes the tokens whose feature e is largest
        moe.router.weight_ED.copy_(torch.eye(4, 8) * 10.0)
    return nn.Sequential(nn.Linear(8, 8), moe, nn.Linear(8, 3))


def _moe_batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features 1-3 large on rank 1, features 2-3 on rank 0: expert 0 never, expert 1 on rank 1 only."""
    g = torch.Generator().manual_seed(100 * rank + t)
    x = torch.randn(12, 8, generator=g) * 0.01
    hot = torch.tensor([2, 3] if rank == 0 else [1, 2, 3])
    x[torch.arange(12), hot[torch.arange(12) % len(hot)]] = 5.0
    return x, torch.randn(12, 3, generator=g)


def _run_moe(rank: int, world: int, mode: str) -> dict:
    model = _moe_model()
    first = model[0]
    with torch.no_grad():  # the first layer passes the features through
        first.weight.copy_(torch.eye(8))
        first.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ddp = DDP(model, bucket_cap_mb=0.001)
    ex = None
    if mode == "masked":
        ex = MaskedExchange(model, optimizer=opt).register(ddp)
    snaps, stats, tokens = [], [], []
    for t in range(4):
        x, y = _moe_batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        tokens.append(model[1].tokens_per_expert.clone())
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if ex is not None:
            stats.append(ex.statistics())
    return {"snaps": snaps, "stats": stats, "tokens": tokens}


@pytest.mark.slow
def test_idle_experts_are_skipped_bit_identical_to_dense() -> None:
    got = run_distributed(_run_moe, 2, "masked", timeout=240)
    want = run_distributed(_run_moe, 2, "dense", timeout=240)
    for t in range(4):
        t0, t1 = got[0]["tokens"][t], got[1]["tokens"][t]
        assert t0[0] == 0 and t1[0] == 0  # expert 0: no token on either rank
        assert t0[1] == 0 and t1[1] > 0  # expert 1: tokens on rank 1 only
        for rank in range(2):
            for name, p in want[rank]["snaps"][t].items():
                assert torch.equal(got[rank]["snaps"][t][name], p), (t, rank, name)
            stats = got[rank]["stats"][t]
            assert stats["exchange/idle_experts"] == 1.0
            assert stats["exchange/packed_fraction"] < 1.0
    # expert 1 (tokens on rank 1 only) moved on both ranks; expert 0 never did
    w0 = _moe_model()[1].experts.w1_EFD.detach()
    w = got[0]["snaps"][-1]["1.experts.w1_EFD"]
    assert not torch.equal(w[1], w0[1]) and torch.equal(w[0], w0[0])


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"`inactive_density` must be None or a number in \(0, 1\], got 1.5"):
        MaskedExchangeConfig(inactive_density=1.5)
    with pytest.raises(ValueError, match="`skip_idle_experts` must be a bool"):
        MaskedExchangeConfig(skip_idle_experts=1)
    saved = MaskedExchange(_model(), inactive_density=0.1).state_dict()
    with pytest.raises(ValueError, match="inactive_density=0.1"):
        MaskedExchange(_model(), inactive_density=0.2).load_state_dict(saved)
