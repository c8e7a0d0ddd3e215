"""Quality of N:M sparse-from-scratch training on the demo LM: dense vs STE vs SR-STE vs MDGF (vs SDGF).

Every run trains the demo GPT from the same initialisation and on the same batches (per seed),
with the transformer blocks' Linears (q/k/v/out_proj, fc_in/fc_out) in the N:M pattern and
embeddings / lm_head dense, then finalises the model (weights exactly N:M) and measures the
validation loss of that exact sparse model. Ratios are against the dense run of the same seed.

    PYTHONPATH=. python benchmarks/nm_quality.py --device cpu --steps 400
    PYTHONPATH=. python benchmarks/nm_quality.py --device cuda --steps 2000 --batch-size 32

Goals (issue 5): SR-STE 2:4 within 3% of dense; SR-STE better than STE; at 1:8, MDGF/SDGF better
than SR-STE (Bambhaniya et al. 2024's claim at high sparsity).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sparsetrain.demo import GPT, CorpusConfig, GPTConfig, make_datasets  # noqa: E402
from sparsetrain.nm import NMConfig, NMSparsifier, is_nm  # noqa: E402

RUNS = [("dense", None)] + [(meth, (2, 4)) for meth in ("ste", "srste", "mdgf", "sdgf")] + \
       [(meth, (1, 8)) for meth in ("ste", "srste", "mdgf", "sdgf")]


def _batches(dataset, batch_size, steps, seed):
    g = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(steps):
        idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
        xs, ys = zip(*(dataset[i] for i in idx))
        yield torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def _val_loss(model, val, batch_size, n_batches, device):
    model.eval()
    losses = []
    for b in range(n_batches):
        items = [val[i] for i in range(b * batch_size, min(len(val), (b + 1) * batch_size))]
        if not items:
            break
        x, y = (torch.stack(t).to(device) for t in zip(*items))
        losses.append(float(model.loss(x, y)))
    model.train()
    return sum(losses) / len(losses)


def run(method, pattern, seed, args, train, val):
    device = torch.device(args.device)
    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, block_size=args.block_size)
    model = GPT(cfg).to(device)
    sp = None
    if method != "dense":
        kw = {"decay_steps": max(1, int(args.decay_fraction * args.steps))} if method in ("mdgf", "sdgf") else {}
        if args.lambda_w is not None and method in ("mdgf", "sdgf"):
            kw["lambda_w"] = args.lambda_w  # SR-STE's decay on top of the decaying masks
        if method == "mdgf":
            kw["decay"] = args.decay
        sp = NMSparsifier(model, NMConfig(n=pattern[0], m=pattern[1], method=method, include=args.include, **kw))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, args.steps // 20)

    def lr_factor(s):  # linear warm-up, cosine decay to 10%
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    flips = []
    start = time.perf_counter()
    for x, y in _batches(train, args.batch_size, args.steps, seed):
        loss = model.loss(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if sp is not None:
            sp.step()
            if sp.last_flip_fraction is not None:
                flips.append(sp.last_flip_fraction)
    out = {"train_seconds": time.perf_counter() - start}
    if sp is not None:
        tail = flips[-max(1, len(flips) // 10):]
        out["flip_last10pct"] = float(torch.stack(tail).mean()) if tail else float("nan")
        sp.finalize()
        assert all(is_nm(mod.weight, *pattern) for mod in sp.layers.values())
    out["val_loss"] = _val_loss(model, val, args.batch_size, args.val_batches, device)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--byte-budget", type=int, default=2_000_000)
    p.add_argument("--val-batches", type=int, default=32)
    p.add_argument("--decay-fraction", type=float, default=0.25, help="MDGF/SDGF decay over this part of the run")
    p.add_argument("--decay", choices=["linear", "exp"], default="linear", help="MDGF's beta schedule")
    p.add_argument("--include", nargs="+", default=["*.attn.*", "*.mlp.*"])
    p.add_argument("--only", nargs="+", default=None, help="subset of runs, e.g. dense srste@2:4")
    p.add_argument("--lambda-w", type=float, default=None,
                   help="SR-STE's decay for mdgf/sdgf (default: NMConfig's, 2e-4; 0 gives their authors' plain "
                        "straight-through gradient)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    train, val = make_datasets(CorpusConfig(byte_budget=args.byte_budget, block_size=args.block_size))
    runs = [(m_, pat) for m_, pat in RUNS
            if args.only is None or (m_ if pat is None else f"{m_}@{pat[0]}:{pat[1]}") in args.only]
    results = {}
    for seed in args.seeds:
        for method, pattern in runs:
            key = method if pattern is None else f"{method}@{pattern[0]}:{pattern[1]}"
            r = run(method, pattern, seed, args, train, val)
            results.setdefault(key, {})[seed] = r
            print(f"seed {seed} {key:12s} val_loss {r['val_loss']:.4f}  flips(last 10%) "
                  f"{r.get('flip_last10pct', float('nan')):.4f}  {r['train_seconds']:.0f}s", flush=True)

    print(f"\nN:M quality: demo GPT d_model={args.d_model} n_layer={args.n_layer} block={args.block_size} "
          f"batch={args.batch_size} steps={args.steps} seeds={args.seeds} device={args.device} "
          f"sparse layers={args.include}")
    print(f"{'run':14s} {'val loss (mean ± sd)':>22s} {'vs dense':>9s} {'mask flips, last 10%':>21s}")
    dense = results.get("dense")
    for key, per_seed in results.items():
        vals = [per_seed[s]["val_loss"] for s in args.seeds]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ratio = ""
        if dense:
            ratio = f"{statistics.mean(v / dense[s]['val_loss'] for v, s in zip(vals, args.seeds)) - 1:+.2%}"
        flips = [per_seed[s].get("flip_last10pct") for s in args.seeds]
        flip = f"{statistics.mean(flips):.4f}" if flips[0] is not None else "-"
        print(f"{key:14s} {statistics.mean(vals):>13.4f} ± {sd:.4f} {ratio:>9s} {flip:>21s}")

    def cmp(a, b):
        if a in results and b in results:
            wins = sum(results[a][s]["val_loss"] < results[b][s]["val_loss"] for s in args.seeds)
            diff = statistics.mean(results[a][s]["val_loss"] - results[b][s]["val_loss"] for s in args.seeds)
            print(f"{a} vs {b}: {diff:+.4f} mean val loss, better in {wins}/{len(args.seeds)} seeds")

    print()
    cmp("srste@2:4", "ste@2:4")
    cmp("srste@1:8", "ste@1:8")
    cmp("mdgf@1:8", "srste@1:8")
    cmp("sdgf@1:8", "srste@1:8")
    cmp("mdgf@2:4", "srste@2:4")


if __name__ == "__main__":
    main()
