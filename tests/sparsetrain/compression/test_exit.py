"""A plain gloo loop with the dynamic sparsifier and the DGC hook exits cleanly, every time.

It used to abort at exit now and then ("terminate called without an active exception", SIGABRT
after ``destroy_process_group``): gloo ran the hook's Python completion callback on its worker
thread and released it, taking the GIL, after DDP had already seen the result, so a main thread
that reached interpreter shutdown in that window took the process down. The hook now finishes
gloo buckets on the calling thread. The race needs whole processes that exit, so each run is two
fresh ranks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("exit_worker.py")
ROOT = Path(__file__).resolve().parents[3]
RUNS = 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_once() -> list[tuple[int, str]]:
    port = _port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=120)
        out.append((p.returncode, text))
    return out


@pytest.mark.slow
def test_the_loop_exits_cleanly_20_times():
    failures = []
    for i in range(RUNS):
        for rank, (code, text) in enumerate(_run_once()):
            if code != 0 or f"ok {rank}" not in text:
                failures.append(f"run {i} rank {rank}: exit code {code}: {text[-300:]}")
    assert not failures, "\n".join(failures)
