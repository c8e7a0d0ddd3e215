"""GPU timing with CUDA events, eager or inside a CUDA graph (host overhead gone)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear import graph_decisions

__all__ = ["cuda_ms"]


def cuda_ms(fn: Callable[[], object], *, reps: int = 10, warmup: int = 2, rounds: int = 3,
            graph: bool = False) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA device: the best of ``rounds`` rounds.

    Eager (``graph=False``): ``reps`` calls between two events, so host time the GPU waits for
    (launch overhead, plan set-up) counts. Graph: ``reps`` calls captured in one CUDA graph (after
    ``warmup`` eager calls on a side stream), the replay timed: the kernels alone; the warm-up and
    the capture run under :func:`~sparsetrain.runtime.linear.graph_decisions`.

    Raises:
        ValueError: ``reps``, ``rounds`` < 1 or ``warmup`` < 0.
    """
    for name, value, low in (("reps", reps, 1), ("rounds", rounds, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if not graph:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(rounds):
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / reps)
        return best
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), graph_decisions():
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), graph_decisions():
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    del g
    return best
