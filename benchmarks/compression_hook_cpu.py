"""CPU cost of the compression hooks in one process: step time per configuration, and a profile.

The two-node benchmark (``compression_twonode.py``) runs two ranks on the same cores, so at
100 Mbit/s the hooks' CPU work decides the ranking once the messages are small. This script
isolates that work: one process, world size 1 (gloo on a local file store), the same demo GPT,
batch and optimizers as the two-node run, no network. Every configuration wraps its own copy
of the model in DDP; they run interleaved (``--steps`` steps each per round, ``--rounds``
rounds, after their warm-up and ramp) and the table gives each one's median step time and, for
DGC, the median of ``last_stats["compress_s"]`` (the hook's work before the exchange)::

    PYTHONPATH=. python benchmarks/compression_hook_cpu.py
    PYTHONPATH=. python benchmarks/compression_hook_cpu.py --profile dgc0.001   # op table of the hook
    PYTHONPATH=. python benchmarks/compression_hook_cpu.py --parts              # DGC hook's parts, ms per step

Configurations: ``fp32`` (DDP's built-in all-reduce, SGD momentum 0.9), ``powersgd`` (torch's
``powerSGD_hook``, rank 4, one bucket as in the two-node run), ``dgc0.01`` / ``dgc0.001``
(:func:`sparsetrain.compression.dgc_hook`, momentum correction 0.9, fp16 values, SGD without
momentum). At world size 1 the hooks still do all their local work (selection, packing,
decoding); only the exchange is trivial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression_twonode import train_step  # noqa: E402  (the step the two-node bench times)

CONFIGS = ("fp32", "powersgd", "dgc0.01", "dgc0.001")


def _setup(args, config: str):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.compression import DGCState, check_optimizer
    from sparsetrain.demo import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                          d_model=args.d_model))
    ddp = DDP(model, **({"bucket_cap_mb": 1024} if config == "powersgd" else {}))
    state = None
    if config == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                            start_powerSGD_iter=args.warmup_steps, use_error_feedback=True,
                                            warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif config.startswith("dgc"):
        state = DGCState(density=float(config[3:]), warmup_steps=args.warmup_steps, ramp_steps=args.ramp_steps,
                         momentum=0.9, value_dtype="fp16").register(ddp)
    elif config != "fp32":
        raise SystemExit(f"unknown configuration {config!r}; allowed: {', '.join(CONFIGS)}")
    dgc = config.startswith("dgc")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0 if dgc else 0.9)
    if dgc:
        check_optimizer(state, opt)
    return ddp, opt, state


def _time_parts() -> dict[str, float]:
    """Wrap the DGC hook's parts with timers (``--parts``); returns the dict they add seconds to:
    ``prepare`` (work before the exchange), ``select`` (the entries' selection, part of prepare),
    ``finish`` (decode and, at the step's last bucket, the state commit) and ``commit``."""
    from sparsetrain.compression import engine

    acc: dict[str, float] = {}

    def timed(owner, name: str, part: str) -> None:
        f = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[part] = acc.get(part, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(engine.CompressionEngine, "compress", "prepare")
    timed(engine.CompressionEngine, "decompress", "finish")
    timed(engine.CompressionEngine, "_commit", "commit")
    for name in ("threshold_indices_segments", "threshold_indices"):  # whichever this version calls
        if hasattr(engine, name):
            timed(engine, name, "select")
    return acc


def _step(ddp, opt, x, y) -> float:
    t0 = time.perf_counter()
    train_step(ddp, opt, x, y)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--ramp-steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default=None, help="profile this configuration's steps instead (torch.profiler)")
    p.add_argument("--rows", type=int, default=25, help="rows of the profile table")
    p.add_argument("--parts", action="store_true", help="also time the DGC hook's parts (see _time_parts)")
    args = p.parse_args(argv)

    import torch.distributed as dist

    from sparsetrain.demo import CorpusConfig, make_datasets

    torch.set_num_threads(args.threads)
    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    train, _ = make_datasets(CorpusConfig(block_size=args.block_size))
    g = torch.Generator().manual_seed(1000)
    n_batches = args.warmup_steps + args.ramp_steps + args.rounds * args.steps
    batches = []
    for _ in range(n_batches):
        idx = torch.randint(0, len(train), (args.batch_size,), generator=g).tolist()
        batches.append(tuple(torch.stack(t) for t in zip(*(train[i] for i in idx))))

    configs = [args.profile] if args.profile else args.configs
    runs = {c: _setup(args, c) for c in configs}
    start = args.warmup_steps + args.ramp_steps
    for ddp, opt, _ in runs.values():  # warm-up and ramp: not timed
        for b in batches[:start]:
            _step(ddp, opt, *b)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        ddp, opt, state = runs[args.profile]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[start:]:
                _step(ddp, opt, *b)
        print(f"{args.profile}: {len(batches) - start} steps profiled (ops by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        dist.destroy_process_group()
        return

    times: dict[str, list[float]] = {c: [] for c in configs}
    hook_ms: dict[str, list[float]] = {c: [] for c in configs}
    parts_acc = _time_parts() if args.parts else {}
    parts_ms: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    for r in range(args.rounds):
        for c, (ddp, opt, state) in runs.items():
            for b in batches[start + r * args.steps : start + (r + 1) * args.steps]:
                parts_acc.clear()
                times[c].append(_step(ddp, opt, *b))
                if c.startswith("dgc"):
                    hook_ms[c].append(state.last_stats["compress_s"] * 1e3)
                    for part, s in parts_acc.items():
                        parts_ms[c].setdefault(part, []).append(s * 1e3)
    print(f"demo GPT d_model={args.d_model} n_layer={args.n_layer}, batch {args.batch_size}x{args.block_size}, "
          f"world size 1, {args.threads} thread(s); median of {args.rounds} interleaved rounds x {args.steps} steps")
    print("\n| configuration | step ms (median) | min-max | DGC compress_s ms (median) |\n|---|---|---|---|")
    for c in configs:
        hm = f"{statistics.median(hook_ms[c]):.1f}" if hook_ms[c] else ""
        print(f"| {c} | {statistics.median(times[c]) * 1e3:.0f} | {min(times[c]) * 1e3:.0f}-{max(times[c]) * 1e3:.0f} "
              f"| {hm} |")
    if args.parts:
        names = ("prepare", "select", "finish", "commit")
        print("\nDGC hook's parts, ms per step (median, min-max):\n\n| configuration | "
              + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for c in configs:
            if parts_ms[c]:
                cells = [f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if (v := parts_ms[c].get(n)) else ""
                         for n in names]
                print(f"| {c} | " + " | ".join(cells) + " |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
