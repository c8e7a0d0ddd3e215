"""Training-step overhead of N:M sparse training vs dense, GPT-2-small-sized, bf16, on one GPU.

Times full optimizer steps (forward, backward, AdamW, and for the sparse runs the sparsifier's
step: schedule, mask recomputation, flip statistics) of the demo GPT at GPT-2-small size
(12 layers, d_model 768, 12 heads, context 1024, vocabulary 50304), with every Linear of the
transformer blocks in 2:4 (embeddings and lm_head dense). Runs are interleaved (dense, sparse,
dense, ...) and each is the median over repeats; ratios are sparse / dense step time.

Rows: ``srste`` recomputes the masks every step (the default; on CUDA the masks of all layers come
from one grouped Triton launch, see ``nm_masks``); ``srste, masks in forward`` computes each mask
inside the forward pass instead (``NMConfig.masks_in_forward``: with ``--compile`` it fuses into the
kernel that reads the weight; stored masks and flip statistics every ``verify_every`` steps);
``srste, eager masks`` recomputes every step without compiling; ``srste, masks every 10`` recomputes
every 10th step; ``srste, fixed masks`` and ``ste, fixed masks`` never recompute (the
parametrization's cost alone, with and without SR-STE's backward term). ``srste, inplace`` and
``ste, inplace, fixed masks`` mask the weights themselves between optimizer steps
(``NMConfig.inplace``: no parametrization; one launch puts the dense weights back before the
optimizer step, adding SR-STE's term, and one masks them again after it).

    PYTHONPATH=. python benchmarks/gpu_nm_overhead.py                 # CUDA only
    PYTHONPATH=. python benchmarks/gpu_nm_overhead.py --precision bf16-true
    PYTHONPATH=. python benchmarks/gpu_nm_overhead.py --compile       # every variant under torch.compile
    PYTHONPATH=. python benchmarks/gpu_nm_overhead.py --smoke         # tiny, on CPU: checks the script
    PYTHONPATH=. python benchmarks/gpu_nm_overhead.py --profile dense srste   # torch.profiler tables

Goal (issue 5): <= 10% slower than dense.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sparsetrain.demo.model import GPT, GPTConfig  # noqa: E402
from sparsetrain.nm import NMConfig, NMSparsifier, grouped, nm_mask, nm_masks  # noqa: E402

VARIANTS = {
    "dense": None,
    "srste": {"method": "srste"},
    "srste, masks in forward": {"method": "srste", "masks_in_forward": True},
    "srste, eager masks": {"method": "srste", "compile_masks": False},
    "srste, masks every 10": {"method": "srste", "update_every": 10},
    "srste, fixed masks": {"method": "srste", "update_every": 0},
    "ste, fixed masks": {"method": "ste", "update_every": 0},
    "srste, inplace": {"method": "srste", "inplace": True},
    "ste, inplace, fixed masks": {"method": "ste", "inplace": True, "update_every": 0},
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(variant, cfg, device, precision, n, m, compile_model=False, compile_mode=None):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    sp = None
    if VARIANTS[variant] is not None:
        sp = NMSparsifier(model, NMConfig(n=n, m=m, include=["*.attn.*", "*.mlp.*"], **VARIANTS[variant]))
    if compile_model:
        model.compiled_loss = torch.compile(model.loss, mode=compile_mode)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    return model, sp, opt


def time_steps(model, sp, opt, batches, device, precision, steps):
    autocast = precision == "bf16-mixed"
    loss_fn = getattr(model, "compiled_loss", model.loss)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(x, y)
        loss.backward()
        if sp is not None:
            sp.before_optimizer_step()  # inplace: the dense weights back (a no-op otherwise)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sp is not None:
            sp.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps * 1e3


def profile(variant, cfg, device, args, batches):
    """Print where a few steps of ``variant`` spend their time (GPU kernels, then CPU ops)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, sp, opt = build(variant, cfg, device, args.precision, args.n, args.m, args.compile, args.compile_mode)
    time_steps(model, sp, opt, batches, device, args.precision, args.warmup)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        ms = time_steps(model, sp, opt, batches, device, args.precision, 5)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    cpu_us = sum(e.self_cpu_time_total for e in events)
    print(f"\n=== profile: {variant} ({ms:.2f} ms/step over 5 steps; per step: GPU kernels "
          f"{gpu_us / 5e3:.2f} ms, host ops {cpu_us / 5e3:.2f} ms, both as the profiler counts them) ===")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    del model, sp, opt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", choices=["bf16-mixed", "bf16-true"], default="bf16-mixed")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script without a GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's loss (forward and backward) in every variant, dense included")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs, no per-kernel launches "
                        "from the host)")
    p.add_argument("--profile", nargs="+", choices=list(VARIANTS), metavar="VARIANT",
                   help="instead of timing, print torch.profiler tables of a few steps of these variants")
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, d_model=64)
        args.batch_size, args.seq, args.steps, args.warmup, args.repeats = 2, 32, 2, 1, 1
        args.variants = [v for v in args.variants if "eager" not in v]
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_nm_overhead.py needs CUDA (use --smoke to check the script on CPU)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg = GPTConfig(vocab_size=50304, block_size=args.seq, n_layer=12, n_head=12, d_model=768)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        t = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq + 1), generator=g)
        batches.append((t[:, :-1].to(device), t[:, 1:].to(device)))

    if args.profile:
        for v in args.profile:
            profile(v, cfg, device, args, batches)
        return

    # Every variant is built (and compiled) once, then the repeats interleave them. Each build of
    # a new model recompiles the same code (GPT.loss); past torch._dynamo's recompile limit (8)
    # it would silently run eagerly, which made later repeats of earlier runs look slow.
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    times = {v: [] for v in args.variants}
    flips = {}
    built = {}
    for v in args.variants:
        try:
            built[v] = build(v, cfg, device, args.precision, args.n, args.m, args.compile, args.compile_mode)
            time_steps(*built[v], batches, device, args.precision, args.warmup)
        except Exception as err:  # noqa: BLE001 - e.g. torch.compile unavailable: report, go on
            print(f"{v}: failed: {type(err).__name__}: {err}".splitlines()[0], flush=True)
            built.pop(v, None)
    for _ in range(args.repeats):
        for v, (model, sp, opt) in built.items():  # interleaved: each repeat times every variant once
            times[v].append(time_steps(model, sp, opt, batches, device, args.precision, args.steps))
            if sp is not None and sp.last_flip_fraction is not None:
                flips[v] = float(sp.last_flip_fraction)
    sparse = next((sp for _, sp, _ in built.values() if sp is not None), None)
    n_layers = len(sparse.layers) if sparse is not None else 0
    n_sparse = sum(sparse.dense_weight(k).numel() for k in sparse.layers) if sparse is not None else 0

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    mode = f"torch.compile (mode {args.compile_mode or 'default'})" if args.compile else "eager"
    print(f"\nN:M training-step overhead: {name}, torch {torch.__version__}, {args.precision}, {mode}, GPT "
          f"{cfg.n_layer}x{cfg.d_model} vocab {cfg.vocab_size}, batch {args.batch_size}x{args.seq} tokens, "
          f"{args.n}:{args.m} on {n_layers} Linears ({n_sparse / 1e6:.1f}M weights), "
          f"median of {args.repeats} x {args.steps} steps")
    dense = statistics.median(times["dense"]) if times.get("dense") else None
    print(f"{'variant':26s} {'ms/step':>9s} {'vs dense':>9s}")
    for v in args.variants:
        if not times[v]:
            print(f"{v:26s} {'failed':>9s}")
            continue
        ms = statistics.median(times[v])
        ratio = f"{ms / dense:.3f}x" if dense else "-"
        each = " ".join(f"{t:.2f}" for t in times[v])
        print(f"{v:26s} {ms:9.2f} {ratio:>9s}   repeats: {each}")
    del built
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The mask computation alone, for the whole model (what one recomputation costs).
    model, sp, _ = build("ste, fixed masks", cfg, device, args.precision, args.n, args.m)
    weights = [sp.dense_weight(name) for name in sp.layers]
    olds = list(sp.masks().values())

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / reps * 1e3

    mask_ms = {"eager nm_mask per layer": timed(lambda: [nm_mask(w, args.n, args.m) for w in weights])}
    if device.type == "cuda":
        mask_ms["nm_masks, one grouped Triton launch, with flip count"] = timed(
            lambda: nm_masks(weights, args.n, args.m, olds, compiled=True))
        mask_ms["nm_masks, one grouped Triton launch, no flip count"] = timed(
            lambda: nm_masks(weights, args.n, args.m, None, compiled=True))
        kernel, grouped._kernel = grouped._kernel, False  # the torch.compile graph instead
        try:
            mask_ms["nm_masks, torch.compile graph, with flip count"] = timed(
                lambda: nm_masks(weights, args.n, args.m, olds, compiled=True))
        finally:
            grouped._kernel = kernel
    # In-place masking's own passes: mask (dense copy aside) and put back (with SR-STE's term).
    shadows = [torch.empty_like(w) for w in weights]
    flat = torch.cat([(~mask).reshape(-1) for mask in olds])
    grads = [torch.zeros_like(w) for w in weights]

    @torch.no_grad()
    def swap_pair():
        if not (grouped.swap(weights, shadows, flat, -1.0)
                and grouped.swap(weights, shadows, flat, 2e-4, restore=True, grads=grads)):
            for w, s, pr, gr in zip(weights, shadows, flat.split([w.numel() for w in weights]), grads):
                s.copy_(w)
                w.addcmul_(s, pr.view(w.shape), value=-1.0)
                w.copy_(s)
                gr.addcmul_(s, pr.view(w.shape), value=2e-4)

    swap_ms = timed(swap_pair)
    for how, ms in mask_ms.items():
        print(f"mask recomputation alone (all {len(weights)} layers, {how}): {ms:.3f} ms")
    print(f"in-place masking alone (all {len(weights)} layers, mask then restore with SR-STE's term): {swap_ms:.3f} ms")
    if flips:
        print("last mask flip fraction: " + ", ".join(f"{k} {f:.4f}" for k, f in flips.items()))


if __name__ == "__main__":
    main()
