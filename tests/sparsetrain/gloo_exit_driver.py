"""Runs a plain gloo loop (dynamic sparsifier + DGC hook on a DDP model) RUNS times on 2 ranks, each
rank a forked process that ends the way a script does, and reports how every process ended.

Usage: ``python gloo_exit_driver.py RUNS [kept|dropped|both]`` (run by ``test_gloo_exit.py``). Torch is imported once,
here; each run forks two fresh ranks that rendezvous through a file store. Even runs keep the model,
the DDP wrapper and the components alive until the interpreter shuts down (a script's globals); odd
runs drop them when the loop's function returns (the DDP reducer then destroys the process group).
The last line is ``clean N of M`` followed by one line per process that did not exit with 0 within
the time limit.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from sparsetrain.compression import DGCState  # noqa: E402
from sparsetrain.sparsity import DynamicSparsifier  # noqa: E402

STEPS = 6
LIMIT_S = 60.0
KEPT: list = []  # what even runs keep until the interpreter shuts down


def one_rank(rank: int, store: str, keep: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = DynamicSparsifier(model, method="rigl", sparsity=0.5, update_every=2, total_steps=STEPS,
                                   verify_every=1, optimizer=opt)
    ddp = DDP(model, bucket_cap_mb=0.001)
    state = DGCState(model, density=0.1, min_numel=10, warmup_steps=2, verify_every=1, optimizer=opt)
    state.register(ddp)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(8, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    dist.destroy_process_group()
    if keep:
        KEPT.extend([model, opt, sparsifier, ddp, state])


def _wait(pid: int, deadline: float) -> str | None:
    """None when the process exited with 0, else how it ended (killed past the deadline: 'hung')."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            code = os.WEXITSTATUS(status)
            return None if code == 0 else f"exit code {code}"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"hung (killed after {LIMIT_S:.0f} s)"
        time.sleep(0.01)


def main(runs: int, ways: str = "both") -> None:
    torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # what the first optimizer imports, imported once
    parent = os.getpid()
    tmp = tempfile.mkdtemp()
    failures = []
    try:
        for run in range(runs):
            keep = {"kept": True, "dropped": False}.get(ways, run % 2 == 0)
            pids = []
            for rank in range(2):
                pid = os.fork()
                if pid == 0:  # the rank: leaves through the interpreter's shutdown, as a script does
                    one_rank(rank, os.path.join(tmp, f"store{run}"), keep)
                    raise SystemExit(0)
                pids.append(pid)
            deadline = time.monotonic() + LIMIT_S
            for rank, pid in enumerate(pids):
                how = _wait(pid, deadline)
                if how is not None:
                    failures.append(f"run {run} ({'kept' if keep else 'dropped'}) rank {rank}: {how}")
    finally:
        if os.getpid() == parent:  # a rank leaving through here must not remove the others' store
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"clean {2 * runs - len(failures)} of {2 * runs}", flush=True)
    for line in failures:
        print(line, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
