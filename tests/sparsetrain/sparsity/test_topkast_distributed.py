"""Top-KAST on 2 gloo ranks: the masked exchange (packing the backward set B) against DDP's own
all-reduce, a resume in the middle of the run, and composition with DGC.

- masked exchange vs plain all-reduce: parameters, ``theta``, both sets and the optimizer state
  bit-identical after every step; the exchange never goes dense and packs exactly ``B``; the sets
  are the same on every rank (the rank check runs after every step);
- a run stopped at step 7 and rebuilt from its state dicts equals the uninterrupted run bit for bit;
- with DGC (momentum correction, top-k of 2%): no weight outside ``B`` changes at any step, the
  parameters stay zero outside ``A``, DGC's residuals and momenta stay zero outside the ``B`` of
  the step's exchange (after a set change they are cleared at the next exchange, composition rule 3).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsetrain import contract
from sparsetrain.compression import DGCState
from sparsetrain.compression.masked import MaskedExchange
from sparsetrain.sparsity import DynamicSparsifier
from sparsetrain.sparsity.topkast import BACKWARD_MASK_NAME, DENSE_NAME
from tests.harness import run_distributed

STEPS = 12
EVERY = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))


def _batch(rank: int, t: int):
    g = torch.Generator().manual_seed(1000 * rank + t)
    return torch.randn(16, 24, generator=g), torch.randn(16, 5, generator=g)


def _build(mode: str):
    model = _model()
    if mode == "dgc":  # DGC's momentum correction owns momentum: plain SGD
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sp = DynamicSparsifier(model, method="topkast", sparsity=0.8, backward_extra=0.1, update_every=EVERY,
                           end_fraction=1.0, total_steps=STEPS, optimizer=opt, verify_every=1)
    ddp = DDP(model, bucket_cap_mb=0.005)  # a few buckets
    comp = None
    if mode == "masked":
        comp = MaskedExchange(model, optimizer=opt).register(ddp)
    elif mode == "dgc":
        comp = DGCState(model, density=0.02, min_numel=16, warmup_steps=2, ramp_steps=0, momentum=0.9,
                        selection="topk")
        comp.register(ddp)
    return model, opt, sp, ddp, comp


def _snapshot(model, opt):
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    out |= {f"buffer/{n}": b.clone() for n, b in model.named_buffers()}  # A, B, theta
    out |= {f"opt/{i}.{k}": v.clone() for i, s in opt.state_dict()["state"].items() for k, v in s.items()
            if isinstance(v, torch.Tensor)}
    return out


def _run(rank: int, world: int, mode: str, resume_at: int | None = None):
    model, opt, sp, ddp, comp = _build(mode)
    snaps, stats, outside = [], [], []
    for t in range(STEPS):
        if resume_at is not None and t == resume_at:
            saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sp.state_dict(),
                     comp.state_dict() if comp is not None else None)
            del model, opt, sp, ddp, comp
            model, opt, sp, ddp, comp = _build(mode)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            sp.load_state_dict(saved[2])
            if comp is not None:
                comp.load_state_dict(saved[3])
        before = {n: (m._buffers[DENSE_NAME].clone(), m._buffers[BACKWARD_MASK_NAME].clone())
                  for n, m in ((n, m) for n, m in model.named_modules() if hasattr(m, DENSE_NAME))}
        x, y = _batch(rank, t)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        snaps.append(_snapshot(model, opt))
        record = {"theta_outside_B": 0, "weight_outside_A": 0, "residual_outside_B": 0.0}
        for n, m in model.named_modules():
            if n not in before:
                continue
            theta0, b0 = before[n]
            record["theta_outside_B"] += int((m._buffers[DENSE_NAME] != theta0)[~b0].sum())
            record["weight_outside_A"] += int((m.weight.detach() != 0)[~m.weight_mask].sum())
            if mode == "dgc":  # against the B of this step's exchange (cleared lazily after a set change)
                b = b0.reshape(-1)
                for table in (comp.residuals, comp.momenta):
                    held = table.get(f"{n}.weight")
                    if held is not None:
                        record["residual_outside_B"] = max(record["residual_outside_B"],
                                                           float(held.reshape(-1)[~b].abs().max()))
        outside.append(record)
        if mode == "masked":
            stats.append(comp.statistics())
    gm = contract.gradient_masks(model)[1]
    return {"snaps": snaps, "stats": stats, "outside": outside, "updates": sp.update_count,
            "regrown": sp.statistics()["sparsity/regrown_total"],
            "b_fraction": sum(int(b.sum()) for b in gm.values()),
            "sparse_buckets": comp.last_stats["sparse_buckets"] if mode == "dgc" else None}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_masked_exchange_is_bit_identical_to_dense_allreduce_and_resumes_exactly():
    dense = run_distributed(_run, 2, "dense", timeout=300)
    masked = run_distributed(_run, 2, "masked", timeout=300)
    resumed = run_distributed(_run, 2, "masked", 7, timeout=300)
    for rank in range(2):
        assert masked[rank]["updates"] >= 4 and masked[rank]["regrown"] > 0  # the sets moved
        for t in range(STEPS):
            _assert_equal(dense[rank]["snaps"][t], masked[rank]["snaps"][t])
            _assert_equal(masked[rank]["snaps"][t], resumed[rank]["snaps"][t])
            assert masked[rank]["outside"][t]["theta_outside_B"] == 0
            assert masked[rank]["outside"][t]["weight_outside_A"] == 0
        stats = masked[rank]["stats"][-1]
        assert stats["exchange/total_dense_steps"] == 0.0  # Top-KAST never needs a dense gradient
        # the packed payload is B's entries plus the dense biases, in fp32
        biases = sum(p.numel() for n, p in _model().named_parameters() if n.endswith("bias"))
        assert stats["exchange/payload_bytes"] == 4 * (masked[rank]["b_fraction"] + biases)
    _assert_equal(masked[0]["snaps"][-1], masked[1]["snaps"][-1])  # the ranks agree


@pytest.mark.slow
def test_with_dgc_no_weight_outside_the_backward_set_changes():
    runs = run_distributed(_run, 2, "dgc", timeout=300)
    for out in runs:
        assert out["updates"] >= 4 and out["regrown"] > 0
        assert out["sparse_buckets"] > 0  # DGC really compressed
        for t, record in enumerate(out["outside"]):
            assert record == {"theta_outside_B": 0, "weight_outside_A": 0, "residual_outside_B": 0.0}, (t, record)
    _assert_equal(runs[0]["snaps"][-1], runs[1]["snaps"][-1])  # the ranks agree
