"""The masked exchange over Horovod, one rank: what ``test_horovod_masked.py`` runs under ``horovodrun``.

Usage: ``horovodrun -np 2 --gloo -H localhost:2 python -m tests.sparsetrain.compression.horovod_masked_worker OUT``
writes ``OUT/rank<r>.pt``: for the lossless mode and for plain ``hvd.allreduce`` followed by masking,
every step's parameters, masks and Adam state; for masked + top-k, every step's masks, local and
averaged gradients (the input of the DGC reference of ``test_masked.py``); with ``inactive_density``
and ``grad_masking="step"``, the run and that of the naive reference DDP hook of
``test_masked_options.py`` (over the gloo group); the MoE model with idle experts, and DDP's dense
all-reduce of it. RigL with
``grad_masking="hook"`` all-reduces its dense gradients over torch.distributed, so a gloo process
group is started next to Horovod; with ``"step"`` it takes them from the Horovod exchange (dense steps).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from sparsetrain import contract
from sparsetrain.compression.horovod import DistributedOptimizer
from sparsetrain.compression.masked import MaskedExchangeConfig
from sparsetrain.sparsity import DynamicSparsifier
from tests.sparsetrain.compression.test_masked import STEPS, TOPK, UPDATE_EVERY, _batch, _model, _snapshot
from tests.sparsetrain.compression.test_masked_options import DENSITY, _moe_batch, _moe_model, _run_inactive, _run_moe


def _sparse(model: nn.Module, grad_masking: str = "hook") -> DynamicSparsifier:
    return DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=UPDATE_EVERY, end_fraction=1.0,
                             total_steps=STEPS, verify_every=0, grad_masking=grad_masking)


def _inactive(rank: int) -> dict:
    """``grad_masking="step"`` with ``inactive_density``: RigL's update steps get top-k outside the masks."""
    model = _model()
    sp = _sparse(model, "step")
    opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), model=model, bucket_cap_mb=0.005,
                               masked=MaskedExchangeConfig(inactive_density=DENSITY))
    sp.attach_optimizer(opt)
    snaps = []
    for t in range(STEPS):
        x, y = _batch(rank, t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        snaps.append(_snapshot(model, opt, sp))
    return {"snaps": snaps, "updates": sp.update_count,
            "dense_steps": opt.masked_exchange.statistics()["exchange/total_dense_steps"]}


def _moe(rank: int) -> dict:
    """The MoE model of ``test_masked_options.py``: idle experts skipped (agreed over ``hvd.allreduce``)."""
    model = _moe_model()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8))
        model[0].bias.zero_()
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), model=model, masked=True,
                               bucket_cap_mb=0.001)
    snaps, idle = [], []
    for t in range(4):
        x, y = _moe_batch(rank, t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters()})
        idle.append(opt.masked_exchange.statistics()["exchange/idle_experts"])
    return {"snaps": snaps, "idle": idle}


def _lossless(rank: int, mode: str, grad_masking: str) -> dict:
    """``mode="masked"``: DistributedOptimizer(masked=True); ``"reference"``: hvd.allreduce then masking."""
    import horovod.torch as hvd

    model = _model()
    sp = _sparse(model, grad_masking)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    if mode == "masked":
        opt = DistributedOptimizer(opt, model=model, masked=True, bucket_cap_mb=0.005)
    sp.attach_optimizer(opt)
    snaps, packed = [], []
    for t in range(STEPS):
        x, y = _batch(rank, t)
        nn.functional.mse_loss(model(x), y).backward()
        if mode == "reference":
            masks = sp.masks()
            for i, (name, p) in enumerate(model.named_parameters()):
                avg = hvd.allreduce(p.grad, op=hvd.Average, name=f"reference.{i}")
                # "step": the sparsifier masks before the optimizer step (after keeping RigL's dense gradient)
                p.grad.copy_(contract.masked(avg, masks[name]) if name in masks and grad_masking == "hook" else avg)
        opt.step()
        opt.zero_grad()
        snaps.append(_snapshot(model, opt, sp))
        if mode == "masked":
            packed.append(opt.masked_exchange.statistics())
    return {"snaps": snaps, "stats": packed, "updates": sp.update_count}


def _topk(rank: int) -> dict:
    model = _model()
    sp = _sparse(model)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model=model, masked=True,
                               bucket_cap_mb=0.005, **TOPK)
    sp.attach_optimizer(opt)
    names = [n for n, _ in model.named_parameters()]
    steps: list = []
    synchronize = opt.synchronize

    def recorded() -> None:
        local = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
        synchronize()
        out = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
        steps[-1]["buckets"].append((names, local, out))

    opt.synchronize = recorded
    for t in range(STEPS):
        steps.append({"masks": {n: m.clone() for n, m in sp.masks().items()}, "buckets": []})
        x, y = _batch(rank, t)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return {"steps": steps, "shapes": shapes, "updates": sp.update_count,
            "stats": opt.masked_exchange.statistics()}


def main(out_dir: str) -> None:
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    dist.init_process_group("gloo", store=dist.FileStore(f"{out_dir}/store", hvd.size()), rank=rank,
                            world_size=hvd.size())
    out = {f"{mode}/{gm}": _lossless(rank, mode, gm) for gm in ("hook", "step") for mode in ("masked", "reference")}
    out["topk"] = _topk(rank)
    out["inactive"] = _inactive(rank)
    out["inactive_ddp_reference"] = _run_inactive(rank, hvd.size(), "reference")  # the naive DDP hook
    out["moe"] = _moe(rank)
    out["moe_ddp_dense"] = _run_moe(rank, hvd.size(), "dense")
    dist.destroy_process_group()
    torch.save(out, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
