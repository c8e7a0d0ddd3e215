"""Overhead of the DGC comm hook where it sends everything: density 1 vs DDP's built-in all-reduce.

Run on 2 GPUs (NCCL)::

    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/gpu_hook_overhead.py
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/gpu_hook_overhead.py --cpu --d-model 128 --n-layer 2 \\
        --rounds 2 --steps 3          # smoke test on CPU (gloo)

Every configuration wraps its own copy of the same demo GPT in DDP and trains on the same
batches; the configurations run interleaved (a few steps each, several rounds) and the table
gives each one's median step time (forward, backward with the exchange, SGD step) and its
ratio to the built-in all-reduce:

- ``builtin``: DDP without a hook (C++ all-reduce; the anchor),
- ``allreduce_hook``: torch's Python ``allreduce_hook`` (the cost of any Python hook),
- ``dgc_d1``: ``dgc_hook`` at density 1 after its warm-up (the cost rule sends everything
  densely; no momentum, so it is torch's all-reduce plus our bookkeeping),
- ``dgc_d1_momentum``: the same with momentum correction (momentum kept in the hook: one more
  pass over the gradient, and the finiteness check),
- ``dgc0.01``: the hook compressing at 1% (for scale; on NVLink compression rarely pays).

Goal (issue 3): ``dgc_d1`` at most 5% slower than ``builtin``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.compression import DGCState  # noqa: E402
from sparsetrain.demo import GPT, GPTConfig  # noqa: E402

CONFIGS = ("builtin", "allreduce_hook", "dgc_d1", "dgc_d1_momentum", "dgc0.01")


def _model(args, config: str, device: torch.device):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                          d_model=args.d_model)).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    momentum = 0.0
    if config == "allreduce_hook":
        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    elif config.startswith("dgc"):
        density = 1.0 if config.startswith("dgc_d1") else float(config[3:])
        momentum = 0.9 if config == "dgc_d1_momentum" else 0.0
        DGCState(density=density, warmup_steps=args.warmup, ramp_steps=0, momentum=momentum).register(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return model, ddp, opt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="the hook's dense warm-up steps (all configs run past it)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (smoke test)")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun --nproc-per-node 2 (see the module docstring)")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here: this benchmark is for the 2-GPU machine (--cpu: smoke test)")
    if args.cpu:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()

    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, 256, (args.batch_size, args.block_size + 1), generator=g).to(device)
    x, y = batch[:, :-1], batch[:, 1:]
    runs = {c: _model(args, c, device) for c in args.configs}

    def step(ddp, opt):
        logits = ddp(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _, ddp, opt in runs.values():  # past the dense warm-up, the bucket rebuild and allocator growth
        for _ in range(args.warmup + 3):
            step(ddp, opt)
    sync()
    times: dict[str, list[float]] = {c: [] for c in runs}
    for _ in range(args.rounds):
        for c, (_, ddp, opt) in runs.items():
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                step(ddp, opt)
                sync()
                times[c].append(time.perf_counter() - t0)
    # every rank timed the same steps; report rank 0's after agreeing on the slowest rank per config
    med = {}
    for c, ts in times.items():
        m = torch.tensor(statistics.median(ts), device=device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        med[c] = float(m)
    if rank == 0:
        n = sum(p.numel() for p in runs[args.configs[0]][0].parameters())
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"{world} x {name}, torch {torch.__version__}, demo GPT {n / 1e6:.1f}M parameters, "
              f"batch {args.batch_size}x{args.block_size}; median of {args.rounds}x{args.steps} interleaved steps")
        print("\n| config | step ms | x builtin |")
        print("|---|---|---|")
        base = med.get("builtin")
        for c, m in med.items():
            ratio = f"{m / base:.3f}" if base else "n/a"
            print(f"| {c} | {m * 1e3:.2f} | {ratio} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
