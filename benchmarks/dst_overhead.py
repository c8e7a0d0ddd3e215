"""Step-time overhead of dynamic sparse training: the same training with and without the sparsifier.

Two identical demo GPTs train on the same batches, one plain (the anchor) and one under a
:class:`~sparsetrain.sparsity.DynamicSparsifier` (RigL by default: gradient-masking hooks, mask
enforcement on weights and optimizer states after every step, a RigL update with dense-gradient
capture every ``--update-interval`` steps). They run in alternating blocks of ``--block`` steps, so
drift of the machine hits both alike; each block covers whole update periods, so mask updates are
amortised as they are over a training run. Printed:

- median step time of each, and the ratio (goal: <= 1.03),
- the enforcement step alone (``apply_masks``: weights + optimizer states) as a share of the
  anchor's step time (goal on GPU: <= 2%),
- one mask update (including the dense-gradient all-reduce, none here on one process) in ms.

The masks do not make the matrix products cheaper (dense kernels on masked tensors): this measures
pure cost. Runs from the repository root without installing::

    PYTHONPATH=. python benchmarks/dst_overhead.py --device cuda
    PYTHONPATH=. python benchmarks/dst_overhead.py --device cpu --rounds 2 --block 20   # small CPU run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsetrain.demo import GPT, GPTConfig  # noqa: E402
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _make(args, device, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))
    return model, opt


def _step(model, opt, x, y, amp, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model.loss(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _timed_block(model, opt, batches, amp, device) -> tuple[float, float]:
    """Per-step wall time and per-step CPU time of this process (all its threads)."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for x, y in batches:
        _step(model, opt, x, y, amp, device)
    _sync(device)
    return (time.perf_counter() - t0) / len(batches), (time.process_time() - c0) / len(batches)


def _time_call(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--method", default="rigl", choices=["rigl", "set", "gmp", "static"])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--enforce-interval", type=int, default=1,
                   help="full mask enforcement every this many steps (1: every step, the default)")
    p.add_argument("--block", type=int, default=None, help="steps per timed block (default: 2 update periods)")
    p.add_argument("--rounds", type=int, default=5, help="alternating blocks per side")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); 1 gives the steadiest CPU times")
    p.add_argument("--control", action="store_true",
                   help="also time a second plain model (plain vs plain ratio = the machine's noise floor)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(name)
    # GPU default: a GPT-2-small-like width; CPU default: the demo size.
    big = device.type == "cuda"
    defaults = dict(batch_size=16 if big else 8, block_size=256 if big else 128, d_model=768 if big else 128,
                    n_layer=6 if big else 2, n_head=12 if big else 2)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.block = args.block or 2 * args.update_interval
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    g = torch.Generator().manual_seed(0)
    n_batches = 8
    batches = [
        tuple(t.to(device) for t in torch.randint(0, 256, (2, args.batch_size, args.block_size), generator=g))
        for _ in range(n_batches)
    ]

    def stream(n):
        return [batches[i % n_batches] for i in range(n)]

    dense_model, dense_opt = _make(args, device)
    sparse_model, sparse_opt = _make(args, device)
    control = _make(args, device) if args.control else None
    total = args.warmup + args.rounds * args.block
    sp = DynamicSparsifier(
        sparse_model,
        DynamicSparsityConfig(method=args.method, sparsity=args.sparsity, update_interval=args.update_interval,
                              end_fraction=1.0, enforce_interval=args.enforce_interval),
        total_steps=total + args.block, optimizer=sparse_opt,
    )
    # Warm-up also aligns the sparse run on an update period, so every timed block holds the same updates.
    _timed_block(dense_model, dense_opt, stream(args.warmup), args.amp, device)
    _timed_block(sparse_model, sparse_opt, stream(args.warmup), args.amp, device)
    if control:
        _timed_block(*control, stream(args.warmup), args.amp, device)
    dense_t, sparse_t, dense_c, sparse_c, control_t, control_c = [], [], [], [], [], []
    for _ in range(args.rounds):
        if control:
            wall, cpu = _timed_block(*control, stream(args.block), args.amp, device)
            control_t.append(wall)
            control_c.append(cpu)
        wall, cpu = _timed_block(dense_model, dense_opt, stream(args.block), args.amp, device)
        dense_t.append(wall)
        dense_c.append(cpu)
        wall, cpu = _timed_block(sparse_model, sparse_opt, stream(args.block), args.amp, device)
        sparse_t.append(wall)
        sparse_c.append(cpu)
    updates_timed = sum(1 for t in range(args.warmup + 1, total + 1) if sp.schedule.is_update_step(t))

    enforce = _time_call(sp.apply_masks, device, repeats=50)
    saved = sp.state_dict()

    def one_update():
        sp._capture = sp.config.method == "rigl"
        x, y = batches[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            sparse_model.loss(x, y).backward()
        sparse_opt.zero_grad(set_to_none=True)
        sp._update(sp.step_count)

    update = _time_call(one_update, device, repeats=3) if args.method != "static" else float("nan")
    sp.load_state_dict(saved)
    # one_update includes a forward/backward: subtract the anchor's step as an upper bound of that part.

    dense_med, sparse_med = statistics.median(dense_t), statistics.median(sparse_t)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_params = sum(w.numel() for w, _ in sp._pairs())
    print(f"# dst_overhead: device={dev} torch={torch.__version__} method={args.method} sparsity={args.sparsity} "
          f"dT={args.update_interval} enforce_interval={args.enforce_interval} "
          f"GPT d_model={args.d_model} n_layer={args.n_layer} "
          f"batch={args.batch_size}x{args.block_size} amp={args.amp} sparsified weights={n_params:,} "
          f"rounds={args.rounds} block={args.block} steps ({updates_timed} updates timed) "
          f"threads={torch.get_num_threads()}")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| anchor step (plain loop), median ms | {dense_med * 1e3:.3f} |")
    print(f"| with sparsifier, median ms (updates amortised) | {sparse_med * 1e3:.3f} |")
    print(f"| ratio with / without | {sparse_med / dense_med:.4f} |")
    print(f"| per-round ratios | {', '.join(f'{s / d:.3f}' for s, d in zip(sparse_t, dense_t))} |")
    if control:
        print(f"| control: second plain model / anchor (noise floor) | "
              f"{statistics.median(control_t) / dense_med:.4f} |")
    if device.type == "cpu":
        # On a shared CPU, process CPU time is less disturbed by other jobs than wall time.
        dc, sc = statistics.median(dense_c), statistics.median(sparse_c)
        print(f"| CPU time per step, anchor / with sparsifier, median ms | {dc * 1e3:.3f} / {sc * 1e3:.3f} |")
        print(f"| CPU-time ratio with / without | {sc / dc:.4f} |")
        print(f"| per-round CPU-time ratios | {', '.join(f'{s / d:.3f}' for s, d in zip(sparse_c, dense_c))} |")
        if control:
            print(f"| control CPU-time ratio (noise floor) | {statistics.median(control_c) / dc:.4f} |")
    print(f"| enforcement (apply_masks) ms | {enforce * 1e3:.3f} |")
    print(f"| enforcement share of anchor step | {enforce / dense_med * 100:.2f}% |")
    print(f"| one mask update incl. one fwd/bwd, ms | {update * 1e3:.2f} |")
    print()
    print(f"- {'PASS' if sparse_med / dense_med <= 1.03 else 'FAIL'}: step-time overhead <= 3% "
          f"({(sparse_med / dense_med - 1) * 100:+.2f}%)")
    print(f"- {'PASS' if enforce / dense_med <= 0.02 else 'FAIL'}: enforcement <= 2% of a step "
          f"({enforce / dense_med * 100:.2f}%; the goal is stated for GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
