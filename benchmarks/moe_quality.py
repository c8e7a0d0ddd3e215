"""Quality of MoE vs dense on the demo LM at the same active parameters per token.

Every run trains the demo GPT from the same seed on the same batches; the MoE runs replace each
block's MLP (D -> 4D -> D, GELU, biases) by an MoE layer of E GELU experts of hidden width 4D/k, so a
token passes through the same number of expert weights as through the dense MLP (plus the router's
D*E). The training loss adds ``moe_losses`` (aux 1e-2, z 1e-3, capacity 1.25 in training, 2.0 in
eval). Reported: validation loss of each run, and its ratio to the dense run of the same seed.

    PYTHONPATH=. python benchmarks/moe_quality.py --smoke
    PYTHONPATH=. python benchmarks/moe_quality.py --device cpu --steps 300 --seeds 0 1 2
    PYTHONPATH=. python benchmarks/moe_quality.py --device cuda --steps 2000 --d-model 256 --n-layer 4

Goal (issue 18): MoE top-2 reaches a lower validation loss than the dense model.
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
from sparsetrain.moe import MoE, moe_losses  # noqa: E402


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


def build(experts, k, seed, args):
    torch.manual_seed(seed)
    cfg = GPTConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head, block_size=args.block_size)
    model = GPT(cfg)
    if experts:
        hidden = cfg.mlp_ratio * cfg.d_model // k
        for block in model.blocks:
            block.mlp = MoE(cfg.d_model, hidden, experts, k, activation="gelu", bias=True,
                            aux_loss_coef=args.aux_coef, z_loss_coef=args.z_coef,
                            capacity_factor=args.capacity_factor, dropless=args.dropless)
            if args.expert_init == "gpt":
                _gpt_init(block.mlp, cfg.n_layer)
    return model


@torch.no_grad()
def _gpt_init(layer, n_layer):
    """The dense GPT's own init for every expert: fc_in N(0, 0.02), fc_out N(0, 0.02/sqrt(2L)), zero biases
    (the layer's default is nn.Linear's uniform +-1/sqrt(fan_in), several times larger at these widths)."""
    ex = layer.experts
    torch.nn.init.normal_(ex.w1_EFD, std=0.02)
    torch.nn.init.normal_(ex.w2_EDF, std=0.02 / math.sqrt(2 * n_layer))
    for b in (ex.b1_EF, ex.b2_ED):
        if b is not None:
            b.zero_()


def active_params(model):
    """Parameters a token passes through: all but the non-selected experts' (embedding rows counted whole)."""
    total = 0
    for m in model.modules():
        if isinstance(m, MoE):
            total += sum(p.numel() for p in m.router.parameters())
            total += sum(p.numel() for p in m.experts.parameters()) * m.k // m.num_experts
    moe_ids = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.parameters()}
    return total + sum(p.numel() for p in model.parameters() if id(p) not in moe_ids)


def run(experts, k, seed, args, train, val):
    device = torch.device(args.device)
    model = build(experts, k, seed, args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, args.steps // 20)

    def lr_factor(s):  # linear warm-up, cosine decay to 10%
        return min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    for x, y in _batches(train, args.batch_size, args.steps, seed):
        loss = model.loss(x.to(device), y.to(device)) + moe_losses(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start
    drop = statistics.mean(m.statistics()["moe/drop_rate"] for m in model.modules() if isinstance(m, MoE)) \
        if experts else 0.0
    return {"val": _val_loss(model, val, args.batch_size, args.val_batches, device), "seconds": seconds,
            "active": active_params(model), "total": sum(p.numel() for p in model.parameters()), "drop": drop}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-batches", type=int, default=20)
    ap.add_argument("--byte-budget", type=int, default=2_000_000)
    ap.add_argument("--configs", nargs="+", default=["dense", "4x1", "4x2", "8x1", "8x2"],
                    help="'dense' or EXPERTSxK")
    ap.add_argument("--aux-coef", type=float, default=1e-2, help="load-balancing loss coefficient")
    ap.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss coefficient")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dropless", action="store_true")
    ap.add_argument("--expert-init", choices=["linear", "gpt"], default="linear",
                    help="experts initialised like nn.Linear (the layer's default) or like the dense GPT's MLP")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of a tiny model, one seed")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.val_batches, args.byte_budget = 5, [0], 2, 200_000
        args.configs = ["dense", "4x2"]
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = make_datasets(CorpusConfig(block_size=args.block_size, byte_budget=args.byte_budget))
    rows = {}
    for name in args.configs:
        experts, k = (0, 1) if name == "dense" else tuple(int(v) for v in name.split("x"))
        rows[name] = [run(experts, k, s, args, train, val) for s in args.seeds]
        print(f"{name}: " + ", ".join(f"seed {s} val {r['val']:.4f} ({r['seconds']:.0f}s)"
                                       for s, r in zip(args.seeds, rows[name])), flush=True)
    print(f"\n{args.steps} steps, batch {args.batch_size} x {args.block_size} tokens, d_model {args.d_model}, "
          f"{args.n_layer} layers, lr {args.lr}, seeds {args.seeds}, device {args.device}; aux {args.aux_coef}, "
          f"z {args.z_coef}, capacity {'dropless' if args.dropless else args.capacity_factor}, "
          f"expert init {args.expert_init}")
    print("| config | active params | total params | val loss (mean +- std) | vs dense, same seed | drop rate |")
    print("|---|---|---|---|---|---|")
    dense = rows.get("dense")
    for name, rs in rows.items():
        vals = [r["val"] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ratio = "-" if dense is None else f"{statistics.mean(r['val'] / d['val'] for r, d in zip(rs, dense)):.4f}"
        print(f"| {name} | {rs[0]['active']:,} | {rs[0]['total']:,} | {statistics.mean(vals):.4f} +- {sd:.4f} | "
              f"{ratio} | {statistics.mean(r['drop'] for r in rs):.3f} |")


if __name__ == "__main__":
    main()
