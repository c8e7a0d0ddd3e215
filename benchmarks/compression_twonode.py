"""Two "nodes" on a shaped link: DGC vs fp32 all-reduce, fp16_compress_hook and PowerSGD.

Each configuration trains the demo GPT for the same number of steps on the same per-rank batches,
with 2 ranks (one per node) under DDP, and reports the median step time of the compressed phase,
the bytes each rank really put on the link per step (the interface's ``tx_bytes`` counter), and
the final validation loss on fixed validation batches. Hooks compared (same warm-up for all
compressors):

- ``fp32``: DDP's built-in all-reduce (the anchor),
- ``fp16``: torch's ``fp16_compress_hook``,
- ``powersgd``: torch's ``powerSGD_hook``, rank 4, ``start_powerSGD_iter`` = our warm-up,
- ``dgc0.01`` / ``dgc0.001``: :func:`sparsetrain.compression.dgc_hook` at density 1% / 0.1%,
  with DGC's momentum correction (the hook owns momentum 0.9; its SGD has none) and fp16 values.

The baselines use SGD with momentum 0.9 (the same update rule DGC's momentum correction
reproduces in its dense limit).

Two parts:

- ``--worker``: the per-rank training script; needs the torch.distributed environment
  (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), e.g. from ``torchrun``; rank 0
  prints one JSON line ``{"result": {...}}``. Runs anywhere (CPU/gloo, or CUDA/NCCL)::

      torchrun --nproc-per-node 2 benchmarks/compression_twonode.py --worker --hook dgc0.01 --steps 20

- default: the orchestration: for each link rate, a :class:`sparsetrain.launch.testbed.TwoHostTestbed`
  (two network namespaces joined by a veth pair shaped with ``tc``; needs root), one ``torchrun``
  per node and configuration, then a table of ratios measured side by side::

      PYTHONPATH=. python benchmarks/compression_twonode.py --rates 100mbit 1gbit --steps 150

  With ``--device cuda`` each node's rank trains on its own GPU (node i gets GPU i; with one GPU
  both share it) and the ranks talk NCCL over the shaped link: NCCL is told the link's interface
  and has its peer-to-peer and shared-memory transports switched off, so every byte goes through
  the veth pair as it would between two hosts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOKS = ("fp32", "fp16", "powersgd", "dgc0.01", "dgc0.001")


# ----------------------------------------------------------------------------- per-rank worker



def train_step(ddp, opt, x, y) -> torch.Tensor:
    """One optimizer step of the language model on a batch (the work every hook is timed on); the loss."""
    logits = ddp(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _tx_bytes(interface: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())
    except OSError:
        return None


def _register(ddp, hook: str, args) -> object | None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from sparsetrain.compression import DGCState

    if hook == "fp32":
        return None
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=args.warmup_steps,
            use_error_feedback=True, warm_start=True,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    if hook.startswith("dgc"):
        state = DGCState(
            density=float(hook[3:]), warmup_steps=args.warmup_steps, ramp_steps=args.ramp_steps, momentum=args.momentum,
            selection=args.selection, value_dtype="fp16",
        )
        return state.register(ddp)
    raise SystemExit(f"--hook must be one of {', '.join(HOOKS)}, got {hook!r}")


def worker(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.compression import check_optimizer
    from sparsetrain.demo import GPT, CorpusConfig, GPTConfig, make_datasets

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    train, val = make_datasets(CorpusConfig(byte_budget=args.byte_budget, block_size=args.block_size))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                          d_model=args.d_model)).to(device)
    # torch's powerSGD_hook issues its later collectives from future callbacks; on gloo those of
    # different buckets can interleave differently on the two ranks (a collective mismatch), so
    # PowerSGD gets one bucket on CPU. The other hooks keep DDP's default buckets.
    one_bucket = args.hook == "powersgd" and not cuda
    cap = 1024 if one_bucket else args.bucket_cap_mb
    ddp = DDP(model, device_ids=[device.index] if cuda else None, **({"bucket_cap_mb": cap} if cap else {}))
    state = _register(ddp, args.hook, args)
    dgc = args.hook.startswith("dgc")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0 if dgc else args.momentum)
    if dgc:
        check_optimizer(state, opt)

    g = torch.Generator().manual_seed(1000 + rank)  # the same batches for every hook
    steady_from = args.warmup_steps + args.ramp_steps
    times, tx0 = [], None
    for step in range(args.steps):
        if step == steady_from:
            dist.barrier()
            tx0 = _tx_bytes(args.interface)
        idx = torch.randint(0, len(train), (args.batch_size,), generator=g).tolist()
        x, y = (torch.stack(t).to(device) for t in zip(*(train[i] for i in idx)))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step(ddp, opt, x, y)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{args.hook}: loss is not finite at step {step}")
    tx1 = _tx_bytes(args.interface)

    model.eval()
    total, n = torch.zeros((), device=device), 0
    with torch.no_grad():
        for b in range(args.val_batches):  # the same validation batches on every rank and hook
            items = [val[(b * args.batch_size + i) % len(val)] for i in range(args.batch_size)]
            x, y = (torch.stack(t).to(device) for t in zip(*items))
            total += model.loss(x, y)
            n += 1
    dist.all_reduce(total)
    val_loss = float(total) / (n * world)

    steady = times[steady_from:] or times
    n_params = sum(p.numel() for p in model.parameters())
    result = {
        "hook": args.hook,
        "world": world,
        "steps": args.steps,
        "params": n_params,
        "step_s_median": statistics.median(steady),
        "step_s_mean": statistics.fmean(steady),
        "step_s_all_mean": statistics.fmean(times),
        "tx_bytes_per_step": None if tx0 is None or tx1 is None else (tx1 - tx0) / max(1, len(steady)),
        "val_loss": val_loss,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    if dgc:
        result["dgc_last"] = dict(state.last_stats)
    if rank == 0:
        print(json.dumps({"result": result}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- orchestration


def _worker_argv(args, hook: str, node: int, port: int) -> list[str]:
    device = [] if args.device == "cuda" else ["--cpu"]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", str(node), "--master-addr", "10.77.0.1", "--master-port", str(port),
        str(Path(__file__).resolve()), "--worker", *device, "--hook", hook,
        "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--ramp-steps", str(args.ramp_steps),
        "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
        "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--momentum", str(args.momentum), "--selection", args.selection, "--threads", str(args.threads),
        "--val-batches", str(args.val_batches), "--byte-budget", str(args.byte_budget),
    ] + (["--bucket-cap-mb", str(args.bucket_cap_mb)] if args.bucket_cap_mb else [])


def orchestrate(args) -> None:
    from sparsetrain.launch.testbed import TwoHostTestbed, unavailable_reason

    reason = unavailable_reason(shaping=True)
    if reason:
        raise SystemExit(f"the two-host test bed is unavailable here: {reason}")
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    envs = [dict(env), dict(env)]
    if args.device == "cuda":
        n_gpu = torch.cuda.device_count()
        if n_gpu < 1:
            raise SystemExit("--device cuda needs a CUDA GPU")
        for node, node_env in enumerate(envs):
            # The bed's host_env already routes NCCL over the link (its interface, a host id per
            # namespace, no peer-to-peer, shared-memory or InfiniBand transports).
            node_env.update(CUDA_VISIBLE_DEVICES=str(node % n_gpu), NCCL_NVLS_ENABLE="0")
    rows: dict[str, dict[str, dict]] = {}
    port = 29600
    for rate in args.rates:
        rows[rate] = {}
        with TwoHostTestbed(rate=rate, delay=args.delay) as bed:
            for rep in range(args.repeats):
                for hook in args.hooks:
                    port += 1
                    res = bed.run([_worker_argv(args, hook, 0, port), _worker_argv(args, hook, 1, port)], env=envs,
                                  timeout=args.timeout, cwd=str(ROOT))
                    line = next((ln for ln in res[0].stdout.splitlines() if ln.startswith('{"result"')), None)
                    if line is None or any(r.returncode != 0 for r in res):
                        print(f"[{rate} {hook}] failed: rc={[r.returncode for r in res]}\n{res[0].stderr[-2000:]}"
                              f"\n{res[1].stderr[-2000:]}", file=sys.stderr)
                        continue
                    r = json.loads(line)["result"]
                    print(f"[{rate} rep {rep} {hook}] {json.dumps(r)}", flush=True)
                    rows[rate].setdefault(hook, []).append(r)
    _table(rows, args)


def _table(rows, args) -> None:
    backend = "NCCL, GPUs" if args.device == "cuda" else "gloo, CPU"
    print(f"\nDemo GPT d_model={args.d_model} n_layer={args.n_layer} batch={args.batch_size}x{args.block_size}, "
          f"2 nodes x 1 rank ({backend}), {args.steps} steps, warm-up {args.warmup_steps} + ramp {args.ramp_steps}; "
          f"step time = median of the steps after warm-up and ramp; bytes = tx_bytes of one node's link / step")
    for rate, by_hook in rows.items():
        print(f"\n### {rate}\n")
        print("| hook | step s (median) | vs fp32 | vs powersgd | MB/step on the link | val loss | vs fp32 val |")
        print("|---|---|---|---|---|---|---|")
        med = {h: statistics.median(r["step_s_median"] for r in rs) for h, rs in by_hook.items()}
        loss = {h: statistics.fmean(r["val_loss"] for r in rs) for h, rs in by_hook.items()}
        for hook, rs in by_hook.items():
            tx = [r["tx_bytes_per_step"] for r in rs if r["tx_bytes_per_step"] is not None]
            speed = med["fp32"] / med[hook] if "fp32" in med else float("nan")
            vs_psgd = med["powersgd"] / med[hook] if "powersgd" in med else float("nan")
            dloss = (loss[hook] / loss["fp32"] - 1) * 100 if "fp32" in loss else float("nan")
            mb = f"{statistics.fmean(tx) / 1e6:.3f}" if tx else "n/a"
            print(f"| {hook} | {med[hook]:.3f} | {speed:.2f}x | {vs_psgd:.2f}x | {mb} | {loss[hook]:.4f} | "
                  f"{dloss:+.1f}% |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true", help="run one rank (needs the torch.distributed env vars)")
    p.add_argument("--hook", default="fp32", help=f"one of {', '.join(HOOKS)} (worker)")
    p.add_argument("--hooks", nargs="+", default=list(HOOKS), help="configurations to compare (orchestration)")
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="link rates (tc units)")
    p.add_argument("--delay", default=None, help="one-way link delay, e.g. 1ms (needs netem)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration, interleaved")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--ramp-steps", type=int, default=40)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--selection", default="threshold", choices=["threshold", "topk"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--byte-budget", type=int, default=2_000_000)
    p.add_argument("--interface", default="st0", help="link interface whose tx_bytes are counted (worker)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (orchestration)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even when CUDA is present (worker)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="orchestration: train on CPU over gloo, or on the GPUs over NCCL (node i on GPU i)")
    p.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="DDP bucket size for every hook (default: DDP's); PowerSGD on CPU always gets one bucket")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps + args.ramp_steps:
        raise SystemExit("--steps must exceed --warmup-steps + --ramp-steps (the steady phase is what is timed)")
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
