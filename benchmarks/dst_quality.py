"""Quality of dynamic sparse training on the demo LM: dense vs static vs SET vs RigL (vs Top-KAST), ERK vs uniform.

Every configuration trains the demo GPT on the standard-library byte corpus for the same number of
optimizer steps, on the same batches (per seed), with the same optimizer, and is scored by its
validation loss on the same fixed validation batches. Seeds change the initialisation, the batch
order and the initial masks. Printed: mean and spread (sample std) of the final validation loss over
the seeds, its ratio to dense, and checks of the ordering the RigL paper reports
(static > SET >= RigL in loss; ERK below uniform) and of the goal "RigL-ERK at 80% within 5% of dense".

Plain PyTorch loop (no Lightning), so it runs from the repository root without installing::

    PYTHONPATH=. python benchmarks/dst_quality.py --device cuda --steps 3000
    PYTHONPATH=. python benchmarks/dst_quality.py --device cpu --steps 20 --seeds 1   # smoke test
    PYTHONPATH=. python benchmarks/dst_quality.py --methods rigl topkast --distributions erk   # Top-KAST vs RigL

Top-KAST (``--methods topkast``) takes ``--backward-extra`` (its M) and ``--exploration-penalty``
(its lambda); ``--update-interval`` is its set-update interval too.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.demo import GPT, CorpusConfig, GPTConfig, make_datasets  # noqa: E402
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig  # noqa: E402


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def _batches(dataset, n_steps: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(n_steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        xs, ys = zip(*(dataset[i] for i in idx))
        yield torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def _val_loss(model, val_batches, device, amp) -> float:
    model.eval()
    total = 0.0
    for x, y in val_batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total += float(model.loss(x.to(device), y.to(device)))
    model.train()
    return total / len(val_batches)


def run_one(args, method: str, sparsity: float, distribution: str, seed: int, data, device) -> dict:
    train, val_batches = data
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    sp = None
    if method != "dense":
        sp = DynamicSparsifier(
            model,
            DynamicSparsityConfig(method=method, sparsity=sparsity, distribution=distribution,
                                  update_every=args.update_interval, drop_fraction=args.drop_fraction,
                                  end_fraction=args.end_fraction, seed=seed, exclude=tuple(args.exclude),
                                  backward_extra=args.backward_extra, exploration_penalty=args.exploration_penalty),
            total_steps=args.steps, optimizer=opt,
        )
    t0 = time.perf_counter()
    for x, y in _batches(train, args.steps, args.batch_size, seed):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    out = {"method": method, "sparsity": sparsity, "distribution": distribution, "seed": seed,
           "val_loss": _val_loss(model, val_batches, device, args.amp), "train_s": elapsed}
    if sp is not None:
        stats = sp.statistics()
        out.update(achieved_sparsity=stats["sparsity/global"], itop_rate=stats["sparsity/itop_rate"],
                   updates=int(stats["sparsity/updates"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-list", type=int, nargs="+",
                   help="run exactly these seeds instead of 0..seeds-1 (e.g. one process per seed)")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="train nothing: print the table and checks of runs saved with --json (all seeds together)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--distributions", nargs="+", default=["erk", "uniform"])
    p.add_argument("--methods", nargs="+", default=["static", "set", "rigl"])
    p.add_argument("--exclude", nargs="+", default=[],
                   help="module-name globs to keep dense, e.g. lm_head (default: every Linear is sparsified)")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense run (when another process of the same seeds runs it; see --merge)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--end-fraction", type=float, default=0.75)
    p.add_argument("--backward-extra", type=float, default=0.1, help="Top-KAST's M (extra backward density)")
    p.add_argument("--exploration-penalty", type=float, default=1e-4, help="Top-KAST's L2 scale lambda")
    p.add_argument("--byte-budget", type=int, default=2_000_000)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--json", type=Path, help="also write every run's result here")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train, val = make_datasets(CorpusConfig(byte_budget=args.byte_budget, block_size=args.block_size))
    n_val = min(len(val), args.val_batches * args.batch_size)
    val_batches = [
        (torch.stack([val[i][0] for i in range(s, min(s + args.batch_size, n_val))]),
         torch.stack([val[i][1] for i in range(s, min(s + args.batch_size, n_val))]))
        for s in range(0, n_val, args.batch_size)
    ]
    configs = ([] if args.no_dense else [("dense", 0.0, "-")]) + [
        (m, s, d) for s in args.sparsities for d in args.distributions for m in args.methods
    ]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not args.merge:  # merged runs carry their own settings, printed when they ran
        print(f"# dst_quality: device={dev_name} torch={torch.__version__} steps={args.steps} seeds={args.seeds} "
              f"batch={args.batch_size}x{args.block_size} d_model={args.d_model} n_layer={args.n_layer} "
              f"dT={args.update_interval} alpha={args.drop_fraction} end={args.end_fraction} amp={args.amp}"
              + (f" topkast_M={args.backward_extra} topkast_lambda={args.exploration_penalty}"
                 if "topkast" in args.methods else "")
              + (f" exclude={','.join(args.exclude)}" if args.exclude else ""))
    results = []
    if args.merge:
        results = [r for f in args.merge for r in json.loads(f.read_text())]
        print(f"# merged {len(results)} runs from {len(args.merge)} files")
    for seed in [] if args.merge else (args.seed_list or range(args.seeds)):
        for method, sparsity, dist in configs:
            r = run_one(args, method, sparsity, dist, seed, (train, val_batches), device)
            results.append(r)
            print(f"  seed {seed} {method:6s} {sparsity:.2f} {dist:7s} val_loss {r['val_loss']:.4f} "
                  f"({r['train_s']:.1f} s)", flush=True)
    if args.json and not args.merge:
        args.json.write_text(json.dumps(results, indent=1))

    def losses(method, sparsity, dist):
        return [r["val_loss"] for r in results
                if r["method"] == method and r["sparsity"] == sparsity and r["distribution"] == dist]

    def mean(xs):
        return statistics.fmean(xs)

    dense = mean(losses("dense", 0.0, "-")) if losses("dense", 0.0, "-") else None  # None: --no-dense
    print()
    print("| method | sparsity | distribution | val loss (mean ± std) | vs dense | achieved sparsity | ITOP rate |")
    print("|---|---|---|---|---|---|---|")
    for method, sparsity, dist in configs:
        ls = losses(method, sparsity, dist)
        std = statistics.stdev(ls) if len(ls) > 1 else 0.0
        rs = [r for r in results if r["method"] == method and r["sparsity"] == sparsity and r["distribution"] == dist]
        ach = f"{mean([r['achieved_sparsity'] for r in rs]):.4f}" if method != "dense" else "0"
        itop = f"{mean([r['itop_rate'] for r in rs]):.3f}" if method != "dense" else "-"
        vs = f"{mean(ls) / dense:.3f}x" if dense else "-"
        print(f"| {method} | {sparsity:.2f} | {dist} | {mean(ls):.4f} ± {std:.4f} | {vs} | "
              f"{ach} | {itop} |")

    print()
    checks = []
    for s in args.sparsities:
        for d in args.distributions:
            if {"static", "set", "rigl"} <= set(args.methods):
                st, se, ri = (mean(losses(m, s, d)) for m in ("static", "set", "rigl"))
                checks.append((f"{d} {s:.2f}: static > SET", st > se))
                checks.append((f"{d} {s:.2f}: SET >= RigL", se >= ri))
        if {"erk", "uniform"} <= set(args.distributions):
            for m in args.methods:
                checks.append((f"{m} {s:.2f}: ERK < uniform",
                               mean(losses(m, s, "erk")) < mean(losses(m, s, "uniform"))))
    if {"rigl", "topkast"} <= set(args.methods):
        for s in args.sparsities:
            for d in args.distributions:
                tk, ri = mean(losses("topkast", s, d)), mean(losses("rigl", s, d))
                checks.append((f"{d} {s:.2f}: Top-KAST within 2% of RigL ({tk / ri:.3f}x)", tk <= 1.02 * ri))
    if dense and 0.8 in args.sparsities and "rigl" in args.methods and "erk" in args.distributions:
        ratio = mean(losses("rigl", 0.8, "erk")) / dense
        checks.append((f"RigL-ERK 0.80 within 5% of dense ({ratio:.3f}x)", ratio <= 1.05))
    for name, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
