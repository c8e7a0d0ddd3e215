"""The expert-parallel MoE path on CPU over gloo: agreement with one process, and all-to-all volume.

P ranks each route T tokens through one MoE layer (E experts, top-k, SwiGLU, fp32) with experts
spread over the ranks, forward + backward. Reported per P: the largest difference from the same layer
run in one process on each rank's tokens (outputs and input gradients), the rows and bytes each rank
sends in the forward's token exchange (the backward sends the same again), against the bytes of a
fixed-capacity one-hot dispatch (DeepSpeed's: E x C x D per rank whatever the routing, C from the
capacity factor), and the median wall time of a forward+backward (a shared 2-core machine: noisy).

    PYTHONPATH=. python benchmarks/moe_ep_cpu.py --worlds 2 4
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from sparsetrain.moe import MoE, expert_state_dict, load_expert_state_dict  # noqa: E402


def _tokens(rank, args):
    return torch.randn(args.tokens, args.d, generator=torch.Generator().manual_seed(100 + rank))


def _layer(args, group=None, seed=0):
    torch.manual_seed(seed)
    return MoE(args.d, args.f, args.experts, args.k, dropless=True, ep_group=group)


def _worker(rank, world, store_path, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    ref = _layer(args)
    layer = _layer(args, dist.group.WORLD, seed=rank + 1)
    layer.router.load_state_dict(ref.router.state_dict())
    load_expert_state_dict(layer, expert_state_dict(ref))
    x = _tokens(rank, args).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    xr = _tokens(rank, args).requires_grad_()
    yr = ref(xr)
    yr.square().sum().backward()
    diff = max((y - yr).abs().max().item(), (x.grad - xr.grad).abs().max().item())
    local = range(rank * args.experts // world, (rank + 1) * args.experts // world)
    sent = int(sum(layer.statistics()[f"moe/load_e{e}"] for e in range(args.experts) if e not in local)
               * args.tokens * args.k + 0.5)
    times = []
    for _ in range(args.reps):
        dist.barrier()
        t0 = time.perf_counter()
        layer(x).square().sum().backward()
        times.append((time.perf_counter() - t0) * 1e3)
    queue.put((rank, diff, sent, statistics.median(times)))
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--f", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    C = math.ceil(args.capacity_factor * args.k * args.tokens / args.experts)
    onehot = args.experts * C * args.d * 4
    print(f"E={args.experts}, k={args.k}, d={args.d}, F={args.f}, {args.tokens} tokens per rank, fp32, dropless")
    print("| ranks | max diff vs 1 process | rows sent per rank (fwd, mean) | MB sent per rank (fwd) | "
          f"one-hot dispatch MB (cf {args.capacity_factor}) | ms fwd+bwd (median, slowest rank) |")
    print("|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "store")
            procs = [ctx.Process(target=_worker, args=(r, world, path, args, queue)) for r in range(world)]
            for p in procs:
                p.start()
            rows = sorted(queue.get(timeout=600) for _ in procs)
            for p in procs:
                p.join()
        diff = max(r[1] for r in rows)
        sent = statistics.mean(r[2] for r in rows)
        print(f"| {world} | {diff:.2e} | {sent:.0f} | {sent * args.d * 4 / 1e6:.2f} | {onehot / 1e6:.2f} | "
              f"{max(r[3] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
