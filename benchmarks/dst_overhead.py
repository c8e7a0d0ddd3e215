"""Step-time overhead of dynamic sparse training: the same training with and without the sparsifier.

Three identical demo GPTs train on the same batches with AdamW: one plain (the anchor) and two under a
:class:`~sparsetrain.sparsity.DynamicSparsifier` (RigL by default: gradient-masking hooks, a RigL update
with dense-gradient capture every ``--update-interval`` steps), one in the default enforcement mode
(``enforce_interval="auto"``: AdamW keeps masked weights and states at zero by itself, so masks are
enforced only at the updates) and one enforcing weights and optimizer states every
``--enforce-interval`` steps (1 by default, the previous default). They run in rotating blocks of
``--block`` steps, so drift of the machine hits all alike; each block covers whole update periods, so
mask updates are amortised as they are over a training run. Printed, side by side for both modes:

- median step time, and the ratio to the anchor (goal: <= 1.03),
- the enforcement work: what runs after a step without a mask update, the full pass (``apply_masks``:
  weights + optimizer states), and the enforcement share of a step averaged over an update period
  (goal on GPU: <= 2%),
- one mask update alone (no forward/backward; including the dense-gradient all-reduce, none here on
  one process) in ms, and its share of a step when amortised over ``--update-interval`` steps.

``--update-only N`` times one mask update alone N times (median, min, max) after the warm-up and
counts the tensor operations it dispatches (``--group-on-cpu``: with CPU layers grouped as on
accelerators), without timing any step.

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
from torch.utils._python_dispatch import TorchDispatchMode

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


def _one_update(args, device, sp, model, opt, batch):
    """A function running one mask update of ``sp`` from one captured dense gradient (RigL), repeatable."""
    t_update = sp.step_count
    dense = {}
    if args.method == "rigl":
        sp._capture = True
        x, y = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            model.loss(x, y).backward()
        opt.zero_grad(set_to_none=True)
        sp._capture = False
        dense = dict(sp._dense_grads)

    def one_update():
        sp._dense_grads = dict(dense)  # _update pops them; with one process it does not change them
        sp._update(t_update)

    return one_update


class _CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it, and those that are views (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.total = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.views += not func._schema.is_mutable and any(r.alias_info for r in func._schema.returns)
        return func(*args, **(kwargs or {}))


def _update_only(args, device, sp, run, batch) -> int:
    """``--update-only N``: time one mask update N times (each after one untimed call), count its operations."""
    sp._group_on_cpu = args.group_on_cpu
    one_update = _one_update(args, device, sp, *run, batch)
    times = [_time_call(one_update, device, repeats=1) for _ in range(args.update_only)]
    with _CountOps() as ops:
        one_update()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# dst_overhead --update-only: device={dev} torch={torch.__version__} method={args.method} "
          f"sparsity={args.sparsity} GPT d_model={args.d_model} n_layer={args.n_layer} "
          f"layers={len(sp.layer_names)} sparsified weights={sum(w.numel() for w, _ in sp._pairs()):,} "
          f"threads={torch.get_num_threads()}")
    print(f"one mask update (incl. its full pass), ms: median {statistics.median(times) * 1e3:.2f}, "
          f"min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f} ({len(times)} timings)")
    print(f"aten operations per update: {ops.total - ops.views} besides {ops.views} views "
          f"(layers grouped: {device.type != 'cpu' or args.group_on_cpu})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--method", default="rigl", choices=["rigl", "set", "gmp", "static"])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--enforce-interval", type=int, default=1,
                   help="the fixed enforcement interval compared with the default auto mode (default 1)")
    p.add_argument("--block", type=int, default=None, help="steps per timed block (default: 2 update periods)")
    p.add_argument("--rounds", type=int, default=5, help="rotating blocks per model")
    p.add_argument("--grad-masking-step", action="store_true",
                   help="also run auto mode with grad_masking='step' (one masking pass before each optimizer "
                        "step instead of a gradient hook per layer)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); 1 gives the steadiest CPU times")
    p.add_argument("--update-only", type=int, default=0, metavar="N",
                   help="only time one mask update, N times after the warm-up steps (median, min, max), and stop")
    p.add_argument("--group-on-cpu", action="store_true",
                   help="with --update-only: update same-shaped CPU layers together, as on accelerators "
                        "(to count the operations a GPU update dispatches)")
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

    total = args.warmup + args.rounds * args.block
    fixed = args.enforce_interval
    modes = {"auto": "auto", f"every {fixed}": fixed}
    if args.grad_masking_step:
        modes["auto, step masking"] = "auto"
    runs = {"anchor": _make(args, device)}
    if args.control:
        runs["control"] = _make(args, device)
    sparsifiers = {}
    for label, interval in modes.items():
        model, opt = runs[label] = _make(args, device)
        sparsifiers[label] = DynamicSparsifier(
            model,
            DynamicSparsityConfig(method=args.method, sparsity=args.sparsity, update_every=args.update_interval,
                                  end_fraction=1.0, enforce_interval=interval,
                                  grad_masking="step" if label.endswith("step masking") else "hook"),
            total_steps=total + args.block, optimizer=opt,
        )
    # Warm-up also aligns the sparse runs on an update period, so every timed block holds the same updates.
    for model, opt in runs.values():
        _timed_block(model, opt, stream(args.warmup), args.amp, device)
    if args.update_only:
        return _update_only(args, device, sparsifiers["auto"], runs["auto"], batches[0])
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:  # rotate who goes first
            w, c = _timed_block(*runs[key], stream(args.block), args.amp, device)
            wall[key].append(w)
            cpu[key].append(c)
    sp0 = sparsifiers["auto"]
    updates_timed = sum(1 for t in range(args.warmup + 1, total + 1) if sp0.schedule.is_update_step(t))

    # Enforcement: what runs after a step without a mask update (averaged over the steps: the pass
    # runs on one step in n), and the full pass.
    per_step, reason = {}, {}
    for label, sp in sparsifiers.items():
        n = sp.effective_enforce_interval
        due = n if n is not None else 1  # a step at which the pass (if any) is due
        per_step[label] = _time_call(lambda sp=sp, due=due: sp._enforce_if_due(due), device, repeats=50) / (n or 1)
        reason[label] = sp.enforcement_reason()
    full_pass = _time_call(sp0.apply_masks, device, repeats=50)

    # One mask update alone: capture the dense gradient once, then time the update from it.
    sp, (model, opt) = sp0, runs["auto"]
    saved = sp.state_dict()
    one_update = _one_update(args, device, sp, model, opt, batches[0])
    update = _time_call(one_update, device, repeats=5) if args.method != "static" else float("nan")
    sp.load_state_dict(saved)

    anchor = statistics.median(wall["anchor"])
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_params = sum(w.numel() for w, _ in sp0._pairs())
    print(f"# dst_overhead: device={dev} torch={torch.__version__} method={args.method} sparsity={args.sparsity} "
          f"dT={args.update_interval} modes=auto,enforce_interval={fixed} "
          f"GPT d_model={args.d_model} n_layer={args.n_layer} "
          f"batch={args.batch_size}x{args.block_size} amp={args.amp} sparsified weights={n_params:,} "
          f"rounds={args.rounds} block={args.block} steps ({updates_timed} updates timed) "
          f"threads={torch.get_num_threads()}")
    for label in modes:
        print(f"# {label}: {reason[label]}")
    print()
    labels = list(modes)
    print(f"| measure | {' | '.join(f'enforce {lb}' for lb in labels)} |")
    print(f"|---|{'---|' * len(labels)}")

    def row(measure, fn):
        print(f"| {measure} | {' | '.join(fn(lb) for lb in labels)} |")

    med = {lb: statistics.median(wall[lb]) for lb in labels}
    row("anchor step (plain loop), median ms", lambda lb: f"{anchor * 1e3:.3f}")
    row("with sparsifier, median ms (updates amortised)", lambda lb: f"{med[lb] * 1e3:.3f}")
    row("**ratio with / without**", lambda lb: f"**{med[lb] / anchor:.4f}**")
    row("per-round ratios", lambda lb: ", ".join(f"{s / d:.3f}" for s, d in zip(wall[lb], wall["anchor"])))
    if args.control:
        row("control: second plain model / anchor (noise floor)",
            lambda lb: f"{statistics.median(wall['control']) / anchor:.4f}")
    if device.type == "cpu":
        # On a shared CPU, process CPU time is less disturbed by other jobs than wall time.
        dc = statistics.median(cpu["anchor"])
        row("CPU ms per step, anchor / with sparsifier",
            lambda lb: f"{dc * 1e3:.3f} / {statistics.median(cpu[lb]) * 1e3:.3f}")
        row("CPU-time ratio with / without", lambda lb: f"{statistics.median(cpu[lb]) / dc:.4f}")
        if args.control:
            row("control CPU-time ratio (noise floor)", lambda lb: f"{statistics.median(cpu['control']) / dc:.4f}")
    row("enforcement after a step without update, ms (mean)", lambda lb: f"{per_step[lb] * 1e3:.4f}")
    row("full enforcement pass (apply_masks), ms", lambda lb: f"{full_pass * 1e3:.3f}")
    dT = args.update_interval
    # Per update period: the per-step part on dT - 1 steps and the full pass that ends the update (static: none).
    at_update = full_pass if args.method != "static" else 0.0
    enforce_share = {lb: (per_step[lb] * (dT - 1) + at_update) / dT / anchor for lb in labels}
    row("enforcement share of a step, averaged over dT (incl. the pass at the update)",
        lambda lb: f"{enforce_share[lb] * 100:.2f}%")
    row("one mask update alone (incl. its full pass), ms", lambda lb: f"{update * 1e3:.2f}")
    row("mask update share of a step, amortised over dT", lambda lb: f"{update / dT / anchor * 100:.2f}%")
    print()
    for lb in labels:
        ratio = med[lb] / anchor
        print(f"- enforce {lb}: {'PASS' if ratio <= 1.03 else 'FAIL'}: step-time overhead <= 3% "
              f"({(ratio - 1) * 100:+.2f}%); {'PASS' if enforce_share[lb] <= 0.02 else 'FAIL'}: enforcement "
              f"<= 2% of a step ({enforce_share[lb] * 100:.2f}%; the goals are stated for GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
