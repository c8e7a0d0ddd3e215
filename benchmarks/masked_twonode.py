"""Two "nodes" on a shaped link: the sparsity-aware exchange against the dense all-reduce and DGC.

The demo GPT trains under RigL (ERK) at ``--sparsity`` (or Top-KAST with ``--method topkast``,
whose exchange packs its backward set, ``--backward-extra`` above the forward density) with 2 ranks
(one per node, gloo over the link of :class:`sparsetrain.launch.testbed.TwoHostTestbed`); each
configuration gets the same per-rank batches and reports the median step time after the warm-up,
the bytes one node really put on the link per step (the interface's ``tx_bytes``), the payload the
exchange reported, and the final validation loss on fixed batches. Configurations:

- ``fp32``: DDP's built-in all-reduce of the whole (masked) gradient (SGD momentum 0.9),
- ``masked``: :class:`sparsetrain.compression.MaskedExchange` (lossless: the same result as ``fp32``),
- ``masked_topk``: the same with DGC top-k on the packed vector (density ``--topk-density``,
  momentum correction 0.9, fp16 values; SGD without momentum),
- ``dgc``: :class:`sparsetrain.compression.DGCState` alone at the same density,
- ``masked_step``: ``masked`` with RigL's ``grad_masking="step"`` (RigL takes its dense gradient
  from the exchange, which goes dense on the update steps, instead of all-reducing it itself);
  ``masked_step_inactive``: the same with ``inactive_density=--inactive-density`` (on those
  steps the entries outside the masks travel top-k compressed),
- ``ddp_d1`` / ``masked_d1``: no sparsity at all: DDP's all-reduce vs the masked hook with
  nothing to pack (its overhead at density 1); ``hook_d1``: torch's own ``allreduce_hook`` (the
  cost of any Python communication hook, as a control);
- ``d1_interleaved``: the three ``_d1`` variants in one run, on three copies of the model,
  their steps interleaved in rotating order (so that the load of a shared machine falls on all
  three alike); reports the median step of each and the median of the per-round ratios.

Worker (one rank; needs the torch.distributed environment)::

    torchrun --nproc-per-node 2 benchmarks/masked_twonode.py --worker --config masked --steps 12

Orchestration (needs root and iproute2; every run bounded by ``--timeout``; the namespaces are
removed when the bed closes)::

    PYTHONPATH=. python benchmarks/masked_twonode.py --rates 100mbit 1gbit --sparsity 0.9 --steps 16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("fp32", "masked", "masked_topk", "dgc", "ddp_d1", "masked_d1", "hook_d1", "d1_interleaved", "masked_step",
           "masked_step_inactive")


def _tx_bytes(interface: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())
    except OSError:
        return None


def _batch(train, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batch_size`` random windows of ``train``, drawn from ``g``."""
    idx = torch.randint(0, len(train), (batch_size,), generator=g).tolist()
    x, y = (torch.stack(t) for t in zip(*(train[i] for i in idx)))
    return x, y


def _timed_step(ddp, opt, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One training step (forward, backward, exchange, optimizer): its wall seconds and its loss."""
    t0 = time.perf_counter()
    logits = ddp(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, loss


def worker(args) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.compression import DGCState, MaskedExchange
    from sparsetrain.demo import GPT, CorpusConfig, GPTConfig, make_datasets
    from sparsetrain.sparsity import DynamicSparsifier

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train, val = make_datasets(CorpusConfig(byte_budget=args.byte_budget, block_size=args.block_size))
    if args.config == "d1_interleaved":
        interleaved_d1(args, train, rank)
        dist.destroy_process_group()
        return
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model))
    cfg = args.config
    compress = cfg in ("masked_topk", "dgc")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0 if compress else 0.9)
    sp = None
    if not cfg.endswith("_d1"):
        sp = DynamicSparsifier(model, method=args.method, sparsity=args.sparsity, distribution="erk",
                               update_every=args.update_every, end_fraction=1.0, total_steps=args.steps,
                               optimizer=opt, verify_every=0, backward_extra=args.backward_extra,
                               grad_masking="step" if cfg.startswith("masked_step") else "hook")
    ddp = DDP(model, **({"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}))
    dgc_cfg = dict(density=args.topk_density, warmup_steps=args.warmup_steps, ramp_steps=0, momentum=0.9,
                   value_dtype="fp16")
    state = None
    if cfg in ("masked", "masked_d1", "masked_step"):
        state = MaskedExchange(model, optimizer=opt).register(ddp)
    elif cfg == "masked_step_inactive":
        state = MaskedExchange(model, optimizer=opt, inactive_density=args.inactive_density).register(ddp)
    elif cfg == "masked_topk":
        state = MaskedExchange(model, optimizer=opt, compression=dgc_cfg).register(ddp)
    elif cfg == "dgc":
        state = DGCState(model, **dgc_cfg).register(ddp)
    elif cfg == "hook_d1":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.allreduce_hook)

    g = torch.Generator().manual_seed(1000 + rank)  # the same batches for every configuration
    times, tx0, payload = [], None, []
    for step in range(args.steps):
        if step == args.warmup_steps:
            dist.barrier()
            tx0 = _tx_bytes(args.interface)
        x, y = _batch(train, args.batch_size, g)
        seconds, loss = _timed_step(ddp, opt, x, y)
        times.append(seconds)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{cfg}: loss is not finite at step {step}")
        if step >= args.warmup_steps and isinstance(state, MaskedExchange):
            payload.append(state.statistics()["exchange/payload_bytes"])
        elif step >= args.warmup_steps and isinstance(state, DGCState):
            payload.append(state.statistics()["compression/payload_bytes"])
    tx1 = _tx_bytes(args.interface)
    model.eval()
    total, n = torch.zeros(()), 0
    with torch.no_grad():
        for b in range(args.val_batches):
            items = [val[(b * args.batch_size + i) % len(val)] for i in range(args.batch_size)]
            x, y = (torch.stack(t) for t in zip(*items))
            total += model.loss(x, y)
            n += 1
    dist.all_reduce(total)
    steady = times[args.warmup_steps:] or times
    n_params = sum(p.numel() for p in model.parameters())
    stats = {} if sp is None else sp.statistics()
    pruned = 0.0 if sp is None else stats["sparsity/global"] * stats["sparsity/total"]
    # the share of the parameters whose gradient is exchanged (Top-KAST: its backward sets)
    exchanged = (stats["sparsity/backward_density"] if "sparsity/backward_density" in stats
                 else 1.0 - stats.get("sparsity/global", 0.0)) * stats.get("sparsity/total", 0.0)
    result = {
        "config": cfg, "sparsity": 0.0 if sp is None else args.sparsity, "steps": args.steps,
        "params": n_params,
        "step_s_median": statistics.median(steady), "step_s_mean": statistics.fmean(steady),
        "tx_bytes_per_step": None if tx0 is None or tx1 is None else (tx1 - tx0) / max(1, len(steady)),
        "payload_bytes_per_step": statistics.fmean(payload) if payload else None,
        "dense_bytes": 4 * n_params,
        "active_fraction": 1 - pruned / n_params,
        "method": args.method if sp is not None else "dense",
        "exchanged_fraction": (n_params - stats.get("sparsity/total", 0.0) + exchanged) / n_params,
        "mask_updates": 0 if sp is None else sp.update_count,
        "val_loss": float(total) / (n * world),
    }
    if rank == 0:
        print(json.dumps({"result": result}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def interleaved_d1(args, train, rank: int) -> None:
    """No sparsity: DDP's built-in all-reduce, the masked hook and torch's allreduce_hook, interleaved."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsetrain.compression import MaskedExchange
    from sparsetrain.demo import GPT, GPTConfig

    variants = {}
    for name in ("ddp", "masked", "hook"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                              d_model=args.d_model))
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        ddp = DDP(model, **({"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}))
        if name == "masked":
            MaskedExchange(model, optimizer=opt).register(ddp)
        elif name == "hook":
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        variants[name] = (ddp, opt, [])
    g = torch.Generator().manual_seed(1000 + rank)
    names = list(variants)
    for step in range(args.steps):
        x, y = _batch(train, args.batch_size, g)
        order = names[step % 3:] + names[:step % 3]
        for name in order:
            ddp, opt, times = variants[name]
            dist.barrier()
            times.append(_timed_step(ddp, opt, x, y)[0])
    w = args.warmup_steps
    med = {n: statistics.median(v[2][w:]) for n, v in variants.items()}
    ratio = {n: statistics.median(a / b for a, b in zip(variants[n][2][w:], variants["ddp"][2][w:]))
             for n in ("masked", "hook")}
    if rank == 0:
        print(json.dumps({"result": {"config": "d1_interleaved", "steps": args.steps, "timed": args.steps - w,
                                     "step_s_median": med, "paired_ratio_median": ratio}}), flush=True)
    dist.barrier()


def _worker_argv(args, cfg: str, node: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--node-rank", str(node), "--master-addr", "10.77.0.1", "--master-port", str(port),
        str(Path(__file__).resolve()), "--worker", "--config", cfg, "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps), "--sparsity", str(args.sparsity),
        "--update-every", str(args.update_every), "--topk-density", str(args.topk_density),
        "--method", args.method, "--backward-extra", str(args.backward_extra),
        "--inactive-density", str(args.inactive_density),
        "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
        "--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--threads", str(args.threads), "--val-batches", str(args.val_batches),
        "--byte-budget", str(args.byte_budget),
    ] + (["--bucket-cap-mb", str(args.bucket_cap_mb)] if args.bucket_cap_mb else [])


def orchestrate(args) -> None:
    from sparsetrain.launch.testbed import TwoHostTestbed, unavailable_reason

    reason = unavailable_reason(shaping=True)
    if reason:
        raise SystemExit(f"the two-host test bed is unavailable here: {reason}")
    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    rows: dict[str, dict[str, dict]] = {}
    port = 29700
    for rate in args.rates:
        rows[rate] = {}
        with TwoHostTestbed(rate=rate) as bed:
            for cfg in args.configs:
                port += 1
                res = bed.run([_worker_argv(args, cfg, 0, port), _worker_argv(args, cfg, 1, port)], env=[env, env],
                              timeout=args.timeout, cwd=str(ROOT))
                line = next((ln for ln in res[0].stdout.splitlines() if ln.startswith('{"result"')), None)
                if line is None or any(r.returncode != 0 for r in res):
                    print(f"[{rate} {cfg}] failed: rc={[r.returncode for r in res]}\n{res[0].stderr[-2000:]}"
                          f"\n{res[1].stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(line)["result"]
                print(f"[{rate} {cfg}] {json.dumps(r)}", flush=True)
                if cfg != "d1_interleaved":
                    rows[rate][cfg] = r
    print(f"\nDemo GPT d_model={args.d_model} n_layer={args.n_layer} batch={args.batch_size}x{args.block_size}, "
          f"{args.method} ERK sparsity {args.sparsity} (update_every {args.update_every}"
          + (f", backward_extra {args.backward_extra}" if args.method == "topkast" else "")
          + "), 2 nodes x 1 rank (gloo, CPU), "
          f"{args.steps} steps, timed after {args.warmup_steps}; top-k density {args.topk_density}")
    for rate, by_cfg in rows.items():
        print(f"\n### {rate}\n")
        print("| config | step s (median) | vs fp32 | MB/step on the link | link bytes / dense bytes "
              "| payload / dense bytes | exchanged share of params | val loss |")
        print("|---|---|---|---|---|---|---|---|")
        for cfg, r in by_cfg.items():
            base = by_cfg.get("ddp_d1" if cfg.endswith("_d1") else "fp32")
            speed = base["step_s_median"] / r["step_s_median"] if base else float("nan")
            tx = r["tx_bytes_per_step"]
            frac = tx / r["dense_bytes"] if tx is not None else float("nan")
            mb = f"{tx / 1e6:.3f}" if tx is not None else "n/a"
            pay = r["payload_bytes_per_step"]
            pay = f"{pay / r['dense_bytes']:.3f}" if pay is not None else "-"
            print(f"| {cfg} | {r['step_s_median']:.3f} | {speed:.2f}x | {mb} | {frac:.3f} | {pay} | "
                  f"{r['exchanged_fraction']:.3f} | {r['val_loss']:.4f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", default="fp32", choices=CONFIGS)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS[:6]), choices=CONFIGS)
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup-steps", type=int, default=4, help="untimed steps (also DGC's dense warm-up)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--update-every", type=int, default=6)
    p.add_argument("--method", default="rigl", choices=["rigl", "topkast"])
    p.add_argument("--backward-extra", type=float, default=0.1, help="Top-KAST's M")
    p.add_argument("--topk-density", type=float, default=0.01)
    p.add_argument("--inactive-density", type=float, default=0.05)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-batches", type=int, default=10)
    p.add_argument("--byte-budget", type=int, default=2_000_000)
    p.add_argument("--bucket-cap-mb", type=float, default=None)
    p.add_argument("--interface", default="st0")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per run (orchestration)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        raise SystemExit("--steps must exceed --warmup-steps")
    if args.worker:
        worker(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
