"""The sparsity-aware exchange (``MaskedExchange`` / ``masked_hook``) against DDP's own all-reduce.

RigL at 80% with a mask update every 3 steps, on gloo ranks, Adam (its state is compared too):

- 2 ranks: parameters, masks and optimizer state bit-identical to DDP without a hook after every
  step; the packing is rebuilt at every mask change; a run resumed in the middle equals both.
- 3 ranks: each averaged gradient equals, element by element, ``(t_a + t_b) + t_c`` for some order
  of the three ranks' terms ``t_r = g_r / 3`` (the reordering of the sum that the shorter packed
  vector may get from gloo's ring); the run stays within float rounding of the dense one.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression.masked import MaskedExchange, carry_packed, masked_hook
from sparsetrain.compression.topk import num_selected
from sparsetrain.sparsity import DynamicSparsifier
from tests.harness import run_distributed

STEPS = 13
UPDATE_EVERY = 3
TOPK = dict(density=0.1, warmup_steps=2, ramp_steps=0, momentum=0.9, selection="topk", min_numel=64,
            cost_rule=False, value_dtype="fp32")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))


def _batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(16, 24, generator=g), torch.randn(16, 5, generator=g)


def _build(mode: str, grad_masking: str = "hook"):
    model = _model()
    if mode == "topk":  # the compression owns momentum: plain SGD
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=UPDATE_EVERY, end_fraction=1.0,
                           total_steps=STEPS, optimizer=opt, grad_masking=grad_masking, verify_every=0)
    ddp = DDP(model, bucket_cap_mb=0.005)  # a few buckets
    ex = None
    if mode in ("masked", "topk"):
        ex = MaskedExchange(model, optimizer=opt, compression=TOPK if mode == "topk" else None)
        ex.register(ddp)
    return model, opt, sp, ddp, ex


def _snapshot(model, opt, sp):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: m.clone() for n, m in sp.masks().items()}
    state = {f"{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()
             if isinstance(v, torch.Tensor)}
    return params, masks, state


def _run(rank: int, world: int, mode: str, grad_masking: str = "hook", resume_at: int | None = None):
    model, opt, sp, ddp, ex = _build(mode, grad_masking)
    snaps, versions, rebuilds, stats = [], [], [], []
    t = 0
    while t < STEPS:
        if resume_at is not None and t == resume_at:
            saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sp.state_dict(),
                     ex.state_dict() if ex is not None else None)
            del model, opt, sp, ddp, ex
            model, opt, sp, ddp, ex = _build(mode, grad_masking)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sp.load_state_dict(saved[2])
            if ex is not None:
                ex.load_state_dict(saved[3])
            resume_at = None
        x, y = _batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        t += 1
        snaps.append(_snapshot(model, opt, sp))
        versions.append(contract.gradient_masks(model)[0][1::2])
        if ex is not None:
            rebuilds.append(ex.rebuilds)
            stats.append(ex.statistics())
    return {"snaps": snaps, "versions": versions, "rebuilds": rebuilds, "stats": stats,
            "updates": sp.update_count}


def _assert_equal(a, b, exact: bool = True) -> None:
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            if exact or part_a[k].dtype == torch.bool:
                assert torch.equal(part_a[k], part_b[k]), k
            else:
                torch.testing.assert_close(part_a[k], part_b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("grad_masking", ["hook", "step"])
def test_two_ranks_bit_identical_to_dense_allreduce(grad_masking: str) -> None:
    dense = run_distributed(_run, 2, "dense", grad_masking, timeout=240)
    masked = run_distributed(_run, 2, "masked", grad_masking, timeout=240)
    for rank in range(2):
        assert dense[rank]["updates"] == masked[rank]["updates"] >= 3
        for t in range(STEPS):
            _assert_equal(dense[rank]["snaps"][t], masked[rank]["snaps"][t])
        # the packing follows every mask change: one build per bucket at every new version
        versions = masked[rank]["versions"]
        changes = sum(1 for a, b in zip(versions, versions[1:]) if a != b)
        assert changes >= 3
        # versions[i]: after step i; a change after step i+1 is packed from step i+2's backward on. From
        # step 2 on (DDP rebuilds its buckets after the first) the packing is rebuilt exactly then.
        rebuilt = masked[rank]["rebuilds"]
        for i in range(1, STEPS - 2):
            assert (rebuilt[i + 2] > rebuilt[i + 1]) == (versions[i] != versions[i + 1]), i
        stats = masked[rank]["stats"][-1]
        if grad_masking == "hook":  # the exchange never went dense
            assert stats["exchange/total_dense_steps"] == 0.0
            assert stats["exchange/packed_fraction"] < 0.5
        else:  # the steps before RigL's updates went dense
            assert stats["exchange/total_dense_steps"] == masked[rank]["updates"]


@pytest.mark.parametrize("mode", ["masked", "topk"])
def test_resume_mid_run_is_exact(mode: str) -> None:
    whole = run_distributed(_run, 2, mode, "hook", timeout=240)
    resumed = run_distributed(_run, 2, mode, "hook", 7, timeout=240)
    for rank in range(2):
        for t in range(STEPS):
            _assert_equal(whole[rank]["snaps"][t], resumed[rank]["snaps"][t])


def _record_hook(record: list):
    def hook(state: MaskedExchange, bucket):
        local = bucket.buffer().clone()
        fut = masked_hook(state, bucket)

        def keep(f):
            out = f.value()
            record[-1][bucket.index()] = (local, out.clone())
            return out

        return fut.then(keep)

    return hook


def _run_recorded(rank: int, world: int) -> list:
    model, opt, sp, ddp, _ = _build("dense")
    record: list = []
    ex = MaskedExchange(model, optimizer=opt)
    ddp.register_comm_hook(ex, _record_hook(record))
    for t in range(STEPS):
        record.append({})  # bucket index -> (local gradient, averaged gradient)
        x, y = _batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [[step[i] for i in sorted(step)] for step in record]


def test_three_ranks_equal_within_reordering_of_the_sum() -> None:
    records = run_distributed(_run_recorded, 3, timeout=240)
    assert all(len(r) == len(records[0]) for r in records)
    items_by_bucket = [items for steps in zip(*records) for items in zip(*steps)]
    assert len(items_by_bucket) > STEPS  # several buckets (one in the first iteration, before DDP rebuilds them)
    for items in items_by_bucket:
        locals_ = [loc for loc, _ in items]
        out = items[0][1]
        for _, other in items[1:]:
            assert torch.equal(out, other)  # every rank gets the same bits
        terms = [g / 3 for g in locals_]
        sums = [(terms[a] + terms[b]) + terms[c] for a, b, c in itertools.permutations(range(3))]
        inside = (out != 0) | (torch.stack(sums) != 0).any(0)
        ok = torch.zeros_like(out, dtype=torch.bool)
        for s in sums:
            ok |= s == out
        ok |= ~inside
        assert bool(ok.all()), f"{int((~ok).sum())} elements are no ordering of the sum"
    dense = run_distributed(_run, 3, "dense", timeout=240)
    masked = run_distributed(_run, 3, "masked", timeout=240)
    for rank in range(3):
        for t in range(STEPS):
            _assert_equal(dense[rank]["snaps"][t], masked[rank]["snaps"][t], exact=False)


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="model"):
        MaskedExchange("model")
    with pytest.raises(ValueError, match="verify_every"):
        MaskedExchange(_model(), verify_every=-1)
    with pytest.raises(TypeError, match="optimizer"):
        MaskedExchange(_model(), optimizer="sgd")
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        MaskedExchange(_model()).register(_model())
    ex = MaskedExchange(_model())
    with pytest.raises(ValueError, match="version"):
        ex.load_state_dict({"version": 9})
    with pytest.raises(ValueError, match="optimizer_steps"):
        ex.load_state_dict({"version": 1, "optimizer_steps": -1, "totals": {}})
    with pytest.raises(TypeError, match="`compression` must be a DGCConfig"):
        MaskedExchange(_model(), compression="dgc")
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\], got 2"):
        MaskedExchange(_model(), compression={"density": 2})
    with_topk = MaskedExchange(_model(), compression=TOPK).state_dict()
    with pytest.raises(ValueError, match="saved with `compression`"):
        ex.load_state_dict(with_topk)
    other = MaskedExchange(_model(), compression={**TOPK, "density": 0.2})
    with pytest.raises(ValueError, match="density=0.1"):
        other.load_state_dict(with_topk)


def test_packing_is_the_masks_in_order() -> None:
    model = _model()
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, total_steps=10)
    ex = MaskedExchange(model)
    ex._open_step()
    params = list(model.parameters())
    packing = ex.packing(params, torch.device("cpu"))
    expected, offset = [], 0
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, params):
        mask = sp.masks().get(name)
        flat = torch.ones(p.numel(), dtype=torch.bool) if mask is None else mask.reshape(-1)
        expected.append(flat.nonzero().squeeze(1) + offset)
        offset += p.numel()
    assert torch.equal(packing.idx_P, torch.cat(expected))
    assert ex.packing(params, torch.device("cpu")) is packing  # same version: cached
    assert ex.rebuilds == 1


# ---------------------------------------------------------------------- masked + top-k (DGC on the packed vector)


def _run_topk_recorded(rank: int, world: int) -> dict:
    model, opt, sp, ddp, _ = _build("dense")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp.detach_optimizers()
    sp.attach_optimizer(opt)
    ex = MaskedExchange(model, optimizer=opt, compression=TOPK)
    names = {id(p): n for n, p in model.named_parameters()}
    steps: list = []

    def hook(state, bucket):
        local = bucket.buffer().clone()
        bucket_names = [names[id(p)] for p in bucket.parameters()]
        fut = masked_hook(state, bucket)

        def keep(f):
            out = f.value()
            steps[-1]["buckets"].append((bucket_names, local, out.clone()))
            return out

        return fut.then(keep)

    ddp.register_comm_hook(ex, hook)
    for t in range(STEPS):
        steps.append({"masks": {n: m.clone() for n, m in sp.masks().items()}, "buckets": []})
        x, y = _batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return {"steps": steps, "shapes": shapes, "updates": sp.update_count, "stats": ex.statistics()}


def _dgc_reference(records: list, world: int) -> list[dict[str, torch.Tensor]]:
    """DGC (Lin et al. 2018, Sec. 3: momentum correction, error feedback, momentum factor masking) per rank
    on the entries inside the masks, kept in natural coordinates and zeroed outside the masks when they
    change; returns each step's averaged gradient per parameter name."""
    m, density = TOPK["momentum"], TOPK["density"]
    shapes = records[0]["shapes"]
    u = [{n: torch.zeros(shapes[n]).reshape(-1) for n in shapes} for _ in range(world)]
    v = [{n: torch.zeros(shapes[n]).reshape(-1) for n in shapes} for _ in range(world)]
    out = []
    for t in range(STEPS):
        masks = records[0]["steps"][t]["masks"]
        local = [{} for _ in range(world)]
        for r in range(world):
            for names, flat, _ in records[r]["steps"][t]["buckets"]:
                offset = 0
                for n in names:
                    k = torch.Size(shapes[n]).numel()
                    local[r][n] = flat[offset:offset + k]
                    offset += k
        averaged = {}
        for n in shapes:
            mask = masks[n].reshape(-1) if n in masks else torch.ones(torch.Size(shapes[n]).numel(), dtype=torch.bool)
            pos = mask.nonzero().squeeze(1)
            compressible = (n in masks or len(shapes[n]) >= 2) and pos.numel() >= TOPK["min_numel"]
            sent = []
            for r in range(world):
                u[r][n] = torch.where(mask, u[r][n], 0.0)  # a mask change clears the state outside the masks
                v[r][n] = torch.where(mask, v[r][n], 0.0)
                u[r][n] = m * u[r][n] + local[r][n]
                total = u[r][n] + v[r][n] if compressible else u[r][n]
                if not compressible or t < TOPK["warmup_steps"]:
                    sent.append(total.clone())
                    if compressible:
                        v[r][n] = torch.zeros_like(total)
                    continue
                top = pos[torch.topk(total[pos].abs(), num_selected(pos.numel(), density)).indices]
                send = torch.zeros_like(total)
                send[top] = total[top]
                sent.append(send)
                v[r][n] = total.clone()
                v[r][n][top] = 0.0
                u[r][n][top] = 0.0
            averaged[n] = sum(s / world for s in sent)
        out.append(averaged)
    return out


def test_masked_topk_follows_the_dgc_equations_across_mask_changes() -> None:
    records = run_distributed(_run_topk_recorded, 2, timeout=240)
    assert records[0]["updates"] >= 3
    expected = _dgc_reference(records, 2)
    changes = 0
    for t in range(STEPS):
        changes += t > 0 and any(not torch.equal(records[0]["steps"][t]["masks"][n],
                                                 records[0]["steps"][t - 1]["masks"][n])
                                 for n in records[0]["steps"][t]["masks"])
        for r in range(2):
            for names, _, got in records[r]["steps"][t]["buckets"]:
                want = torch.cat([expected[t][n] for n in names])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"step {t} rank {r} {names}")
    assert changes >= 3  # the state was carried across several mask changes
    stats = records[0]["stats"]
    assert 0 < stats["exchange/topk_sent_fraction"] < 0.5


def test_carry_packed_keeps_the_positions_that_stay() -> None:
    old = torch.tensor([1, 4, 6, 9])
    new = torch.tensor([0, 4, 7, 9])
    values = torch.tensor([10.0, 40.0, 60.0, 90.0])
    assert torch.equal(carry_packed(values, old, new, 12), torch.tensor([0.0, 40.0, 0.0, 90.0]))
