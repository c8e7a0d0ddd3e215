"""Top-k selection speed on the GPU: our sampled-threshold selection vs ``torch.topk`` vs a copy.

For fp32 gradients of 25M and 100M elements at density 0.001, times (CUDA events, median of
``--reps`` after warm-up) of:

- ``ours``: :func:`sparsetrain.compression.threshold_indices` as the hook calls it (strided 1%
  sample, then on CUDA two Triton passes, counting and writing the entries at or above the
  threshold with their magnitudes' bits, see :mod:`sparsetrain.compression.compact`, and a stable
  sort of those when more than k pass),
- ``ours, mask search``: the same positions found the previous way, with a compare of the whole
  tensor fused into one pass by ``torch.compile``, ``nonzero``, and a stable sort of the candidates'
  magnitudes (``ours, mask search, eager``: without ``torch.compile``; ``ours, mask search, topk of
  candidates``: ``torch.topk`` instead of the sort),
- ``torch.topk``: ``torch.topk(x.abs(), k, sorted=False)`` (the exact anchor),
- ``copy``: ``buf.copy_(x)`` into a preallocated buffer, the copy floor (one read and one write
  of the gradient; earlier versions timed ``x.clone()`` while keeping every result, which timed
  the allocator too and overstated the floor),

each as a ratio to the copy floor, and how many entries the threshold selection returned
relative to k (min / median / max over the repetitions; every repetition uses a new sample
offset, as successive training steps do). Two value distributions: normal, and heavy-tailed
(normal times a uniform to the 4th power), closer to real gradients.

Goal (issue 3): ours <= 3x the copy floor at 100M (torch.topk is ~10x there), count within 10% of k.

    PYTHONPATH=. python benchmarks/gpu_topk.py                          # on the lent GPU
    PYTHONPATH=. python benchmarks/gpu_topk.py --device cpu --sizes 200000 --reps 3   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.compression import _topk_cpu, _topk_cuda, compact  # noqa: E402
from sparsetrain.compression.topk import (  # noqa: E402
    DEFAULT_TUNING,
    num_selected,
    sample_stride,
    threshold_indices,
)


def _timer(device: torch.device):
    if device.type == "cuda":
        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn(0)
            torch.cuda.synchronize()
            times, outs = [], []
            for r in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(r + 1)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
                outs.append(out)
            return times, outs
    else:
        def run(fn, reps, warmup):
            for _ in range(warmup):
                fn(0)
            times, outs = [], []
            for r in range(reps):
                t0 = time.perf_counter()
                out = fn(r + 1)
                times.append((time.perf_counter() - t0) * 1e3)
                outs.append(out)
            return times, outs
    return run


def _breakdown(run, x, k, stride, args, floor) -> None:
    """Time the stages of :func:`threshold_indices` one by one (first round only)."""
    n = x.numel()
    sample = x[::stride].abs()
    k_s = min(sample.numel(), max(1, math.ceil(1.3 * k * sample.numel() / n)))
    t = torch.topk(sample, k_s, sorted=False).values.min()
    mask = _topk_cuda._at_least(x, t)
    idx = mask.nonzero().view(-1)
    grouped = _topk_cpu._grouped_at_least(x, 16)
    hits = compact.at_least(x, t) if compact.available(x) else None
    stages = {
        "sample abs(x[::stride])": lambda r: _discard(x[r % stride :: stride].abs()),
        f"topk of the sample (k_s={k_s})": lambda r: _discard(torch.topk(sample, k_s, sorted=False).values.min()),
        "abs(x) >= t (fused)": lambda r: _discard(_topk_cuda._at_least(x, t)),
        "nonzero of the mask": lambda r: _discard(mask.nonzero()),
        f"exact top-k of the {idx.numel()} candidates": lambda r: _discard(
            idx[torch.topk(x[idx].abs(), min(k, idx.numel()), sorted=False).indices]),
        f"stable sort of the {idx.numel()} candidates": lambda r: _discard(
            idx[torch.sort(x[idx].abs(), descending=True, stable=True).indices[:k]]),
        "column maxima over 16 rows (grouped search)": lambda r: _discard(_topk_cpu._grouped_at_least(x, 16)),
        "grouped search at t, given the maxima": lambda r: _discard(grouped(t)),
    }
    stages["sort of the sample (alternative to its topk)"] = lambda r: _discard(
        torch.sort(sample, descending=True).values[k_s - 1])
    if hits is not None:
        c, starts = compact.count_at_least(x, t)
        stages["compaction pass 1 (Triton): count per block, cumsum"] = lambda r: _discard(
            compact.count_at_least(x, t))
        stages["compaction pass 2 (Triton): write the hits"] = lambda r: _discard(
            compact.write_hits(x, t, starts, int(c)))
        pos, bits = compact.split(hits)
        stages[f"stable sort of the {hits.numel()} written magnitudes"] = lambda r: _discard(
            pos[torch.sort(bits, descending=True, stable=True).indices[:k]])
    for name, fn in stages.items():
        ms = statistics.median(run(fn, args.reps, args.warmup)[0])
        print(f"|   | stage | {name} | {ms:.3f} | {ms / floor:.2f} | | |")


def _tune(run, x, k, stride, args, floor) -> None:
    """Time the two compaction passes for each block size and warp count (the defaults are
    ``compact.BLOCK``, ``COUNT_WARPS``, ``WRITE_WARPS``)."""
    if not compact.available(x):
        return
    n = x.numel()
    sample = x[::stride].abs()
    k_s = min(sample.numel(), max(1, math.ceil(1.3 * k * sample.numel() / n)))
    t = torch.topk(sample, k_s, sorted=False).values.min()
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            kw = {"block": block, "warps": warps}
            c, starts = compact.count_at_least(x, t, **kw)
            ms1 = statistics.median(run(lambda r, kw=kw: _discard(compact.count_at_least(x, t, **kw)), args.reps,
                                        args.warmup)[0])
            ms2 = statistics.median(run(lambda r, s=starts, c=int(c), kw=kw: _discard(
                compact.write_hits(x, t, s, c, **kw)), args.reps, args.warmup)[0])
            print(f"|   | tune | BLOCK {block}, {warps} warps: pass 1 {ms1:.3f} ms, pass 2 {ms2:.3f} ms "
                  f"| {ms1 + ms2:.3f} | {(ms1 + ms2) / floor:.2f} | | |")


def _discard(_result) -> None:
    """Drop a timed call's result at once (keeping 400 MB results would time the allocator)."""


def _data(n: int, dist: str, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=g, device=device)
    if dist == "heavy":
        x *= torch.rand(n, generator=g, device=device) ** 4
    return x


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", nargs="+", type=int, default=[25_000_000, 100_000_000])
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--sample-ratio", type=float, default=0.01)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dists", nargs="+", default=["normal", "heavy"])
    p.add_argument("--breakdown", action="store_true", help="also time each stage of our selection separately")
    p.add_argument("--tune", action="store_true", help="also time the compaction passes per block size and warps")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: this benchmark is for the GPU machine "
                         "(use --device cpu --sizes 200000 for a smoke test of the script)")
    device = torch.device(args.device)
    run = _timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, density {args.density}, "
          f"median of {args.reps} after {args.warmup} warm-up runs")
    print("\n| n | values | method | ms | x copy floor | x torch.topk | count / k (min, median, max) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        k = num_selected(n, args.density)
        stride = sample_stride(n, args.density, args.sample_ratio)
        for dist in args.dists:
            x = _data(n, dist, device)
            rows = {}

            def ours(r, x=x, k=k, stride=stride):
                return threshold_indices(x, k, stride=stride, offset=r)

            def variant(x, k, stride, **fields):
                tuning = dataclasses.replace(DEFAULT_TUNING, **fields)

                def fn(r):
                    return threshold_indices(x, k, stride=stride, offset=r, tuning=tuning)
                return fn

            # The floor copies into a preallocated buffer: a fresh clone per repetition would time
            # the allocator too (each 400 MB result is kept, so every clone would be a new cudaMalloc).
            buf = torch.empty_like(x)
            rows["copy"] = run(lambda r, x=x, buf=buf: _discard(buf.copy_(x)), args.reps, args.warmup)
            del buf
            rows["torch.topk"] = run(lambda r, x=x, k=k: _discard(torch.topk(x.abs(), k, sorted=False)),
                                     args.reps, args.warmup)
            rows["ours"] = run(ours, args.reps, args.warmup)
            if device.type == "cuda":
                for label, fields in (("ours, topk of the sample", {"cuda_sample_kth": "topk"}),
                                      ("ours, mask search", {"cuda_search": "mask"}),
                                      ("ours, mask search, topk of candidates",
                                       {"cuda_search": "mask", "cuda_final": "topk"}),
                                      ("ours, mask search, eager",
                                       {"cuda_search": "mask", "cuda_fused_compare": False})):
                    rows[label] = run(variant(x, k, stride, **fields), args.reps, args.warmup)
            floor = statistics.median(rows["copy"][0])
            ref = statistics.median(rows["torch.topk"][0])
            for method, (times, outs) in rows.items():
                ms = statistics.median(times)
                counts = ""
                if method.startswith("ours"):
                    c = sorted(o.numel() / k for o in outs)
                    counts = f"{c[0]:.3f}, {statistics.median(c):.3f}, {c[-1]:.3f}"
                label = method
                print(f"| {n / 1e6:g}M | {dist} | {label} | {ms:.3f} | {ms / floor:.2f} | {ms / ref:.2f} | {counts} |")
            if args.breakdown:
                _breakdown(run, x, k, stride, args, floor)
            if args.tune:
                _tune(run, x, k, stride, args, floor)
            del x


if __name__ == "__main__":
    main()
