"""The Horovod DistributedOptimizer against the reference DGC equations.

Over real Horovod (``horovodrun -np 2 --gloo``) when ``horovod.torch`` is importable, and
always over a stand-in that implements the three Horovod calls the optimizer uses with
torch.distributed (gloo), so the optimizer's own logic is checked without Horovod.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sparsetrain.compression.horovod import DistributedOptimizer
from tests.harness import run_distributed
from tests.sparsetrain.compression import horovod_worker
from tests.sparsetrain.compression.test_dgc import MATH_CONFIGS, SHAPES, _close, _Injector, _reference

ROOT = Path(__file__).resolve().parents[3]


def _check(results, world):
    for name in horovod_worker.CONFIGS:
        ref = _reference({**MATH_CONFIGS[name], "selection": "threshold"}, world, horovod_worker.STEPS)
        param = {p: torch.zeros(s) for p, s in SHAPES.items()}
        for t in range(horovod_worker.STEPS):
            for r in range(world):
                got = results[r][name][t]
                for p in SHAPES:
                    assert torch.equal(got["grad"][p], results[0][name][t]["grad"][p]), (name, t, r, p)
                    _close(got["grad"][p], ref[t]["grad"][p], f"{name} step {t} rank {r} grad {p}")
                for p, x in ref[t]["residual"][r].items():
                    _close(got["residual"][p], x, f"{name} step {t} rank {r} residual {p}")
                for p, x in ref[t]["momentum"][r].items():
                    _close(got["momentum"][p], x, f"{name} step {t} rank {r} momentum {p}")
            for p in SHAPES:  # SGD(lr=1) applied exactly the exchanged gradient
                param[p] = param[p] - ref[t]["grad"][p]
                torch.testing.assert_close(results[0][name][t]["param"][p], param[p], rtol=1e-5, atol=1e-5)


def _gloo_horovod() -> types.ModuleType:
    """``hvd.size/allgather_async/allreduce_async/synchronize/Sum`` over torch.distributed."""
    hvd = types.ModuleType("horovod.torch")
    hvd.Sum = "sum"
    hvd.size = dist.get_world_size
    hvd.rank = dist.get_rank

    def allgather_async(t, name=None):
        out = torch.empty(dist.get_world_size() * t.shape[0], *t.shape[1:], dtype=t.dtype)
        dist.all_gather_into_tensor(out, t.contiguous())
        return out

    def allreduce_async(t, name=None, op=None):
        assert op == "sum"
        out = t.clone()
        dist.all_reduce(out)
        return out

    hvd.allgather_async, hvd.allreduce_async, hvd.synchronize = allgather_async, allreduce_async, lambda h: h
    return hvd


def _gloo_ranks(rank, world):
    sys.modules["horovod"] = types.ModuleType("horovod")
    sys.modules["horovod.torch"] = _gloo_horovod()
    return horovod_worker.run(rank)


def _has_horovod() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(_has_horovod(), reason="Horovod is installed: test_horovodrun_matches_reference covers this")
def test_distributed_optimizer_over_gloo_matches_reference():
    _check(run_distributed(_gloo_ranks, 2, timeout=240), 2)


def test_bad_input():
    model = _Injector()
    with pytest.raises(ValueError, match=r"optimizer `momentum` must be 0"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), momentum=0.9)
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\]"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), density=2.0)
    with pytest.raises(ValueError, match="`named_parameters` must name every parameter"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters())[:2])


def _horovodrun() -> str:
    pytest.importorskip("horovod.torch", reason="horovod.torch is not importable (Horovod with PyTorch not built)")
    exe = shutil.which("horovodrun") or str(Path(sys.executable).with_name("horovodrun"))
    if not Path(exe).exists():
        pytest.skip("horovodrun is not on PATH")
    return exe


def run_horovod_worker(module: str, timeout: float) -> list[dict]:
    """Run ``python -m module TMP`` on 2 gloo ranks under ``horovodrun``; each rank's saved ``rank<r>.pt``."""
    exe = _horovodrun()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        cmd = [exe, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, "-m", module, tmp]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_horovodrun_matches_reference():
    _check(run_horovod_worker("tests.sparsetrain.compression.horovod_worker", timeout=240), 2)
