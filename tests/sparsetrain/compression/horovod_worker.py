"""DGC over Horovod, one rank: what ``test_horovod.py`` runs under ``horovodrun`` (and over gloo).

Usage: ``horovodrun -np 2 --gloo -H localhost:2 python -m tests.sparsetrain.compression.horovod_worker OUT_DIR``
writes ``OUT_DIR/rank<r>.pt`` with every step's averaged gradients, residuals, momenta and parameters.
"""

from __future__ import annotations

import sys

import torch

from sparsetrain.compression.horovod import DistributedOptimizer
from tests.sparsetrain.compression.test_dgc import BUCKET_MB, MATH_CONFIGS, SHAPES, _by_short_name, _grads, _Injector

CONFIGS = ("error_feedback", "momentum_clip_ramp", "nesterov_fp16_nomask")
STEPS = 20


def run(rank: int, selection: str = "threshold") -> dict:
    out = {}
    for name in CONFIGS:
        model = _Injector()
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(),
                                   bucket_cap_mb=BUCKET_MB, **{**MATH_CONFIGS[name], "selection": selection})
        steps = []
        for t in range(STEPS):
            grads = _grads(rank, t)
            for n, p in model.ps.items():
                p.grad = grads[n].clone()
            opt.step()
            steps.append({
                "grad": {n: p.grad.clone() for n, p in model.ps.items()},
                "param": {n: p.detach().clone() for n, p in model.ps.items()},
                "residual": _by_short_name(opt.dgc_state.residuals),
                "momentum": _by_short_name(opt.dgc_state.momenta),
            })
        out[name] = steps
    assert set(SHAPES) == set(model.ps)
    return out


def main(out_dir: str) -> None:
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    torch.save(run(hvd.rank()), f"{out_dir}/rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
