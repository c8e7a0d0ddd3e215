"""Step-time overhead of the DynamicSparsity Lightning callback: the same Trainer.fit with and without it.

The demo GPT (by default the size ``dst_overhead.py`` uses on a GPU: 6 x 768, context 256, batch
16) trains with AdamW under ``lightning.Trainer`` on synthetic token batches, three ways:

- ``plain``: no callback (the anchor);
- ``callback``: ``DynamicSparsity(method="rigl", sparsity=0.9, update_every=100)`` with its
  defaults, i.e. ``grad_masking="auto"`` (one masking pass before each optimizer step here);
- ``callback, hooks``: the same with ``grad_masking="hook"`` (a gradient hook per layer).

Each round fits every variant once, from the same initial weights, for ``--warmup`` steps and then
``--block`` timed steps (two update periods by default, so RigL's updates are amortised as over a
run); the device is synchronised only at the ends of the timed block. Printed: the median over
rounds of the time per step, and the ratio to ``plain`` (goal of issue 4: <= 1.03).

    PYTHONPATH=. python benchmarks/dst_lightning_overhead.py                  # CUDA
    PYTHONPATH=. python benchmarks/dst_lightning_overhead.py --smoke          # tiny, on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from sparsetrain.callbacks import DynamicSparsity  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from sparsetrain.demo import GPTConfig  # noqa: E402
from sparsetrain.demo.lightning import DemoLM  # noqa: E402

VARIANTS = {
    "plain": None,
    "callback": {},
    "callback, hooks": {"grad_masking": "hook"},
}


class _BlockTimer(Callback):
    """Wall time of the steps after ``warmup``, synchronising the device only at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0 = self.t1 = None
        self.steps = 0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            self._sync(pl_module)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    @property
    def ms_per_step(self) -> float:
        return (self.t1 - self.t0) / self.steps * 1e3


def fit_once(variant: str, args, cfg: GPTConfig, loader: DataLoader, accelerator: str) -> float:
    torch.manual_seed(0)
    task = DemoLM(cfg, optimizer="adamw", lr=1e-3, weight_decay=0.01)
    timer = _BlockTimer(args.warmup)
    callbacks = [timer]
    if VARIANTS[variant] is not None:
        callbacks.insert(0, DynamicSparsity(method="rigl", sparsity=args.sparsity, update_every=args.update_interval,
                                            log_stats=False, **VARIANTS[variant]))
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=args.warmup + args.block, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, precision=args.precision)
    trainer.callbacks.extend(callbacks)
    trainer.fit(task, loader)
    return timer.ms_per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--block", type=int, default=None, help="timed steps per fit (default: 2 update periods)")
    p.add_argument("--update-interval", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true or bf16-mixed")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--smoke", action="store_true", help="a tiny model on CPU, to check the script")
    args = p.parse_args(argv)
    if args.smoke:
        accelerator = "cpu"
        args.rounds, args.warmup, args.update_interval, args.batch_size = 1, 2, 3, 2
        args.block_size, args.d_model, args.n_layer, args.n_head = 32, 64, 2, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("dst_lightning_overhead.py needs CUDA (use --smoke to check the script on CPU)")
        accelerator = "gpu"
        torch.backends.cuda.matmul.allow_tf32 = True
    args.block = args.block or 2 * args.update_interval
    cfg = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (32 * args.batch_size, args.block_size + 1), generator=g)
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch_size, shuffle=False)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*has no `val_dataloader`.*|.*Skipping val loop.*")
    times = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:  # interleaved: each round fits every variant once
            times[v].append(fit_once(v, args, cfg, loader, accelerator))

    name = torch.cuda.get_device_name() if accelerator == "gpu" else "cpu (smoke)"
    print(f"\nDynamicSparsity callback overhead: {name}, torch {torch.__version__}, lightning {pl.__version__}, "
          f"{args.precision}, GPT {args.n_layer}x{args.d_model} context {args.block_size}, batch {args.batch_size}, "
          f"RigL {args.sparsity} dT={args.update_interval}, {args.block} timed steps per fit after {args.warmup}, "
          f"median of {args.rounds} rounds")
    base = statistics.median(times["plain"]) if times.get("plain") else None
    print(f"{'variant':18s} {'ms/step':>9s} {'vs plain':>9s}")
    for v in args.variants:
        ms = statistics.median(times[v])
        ratio = f"{ms / base:.3f}x" if base else "-"
        print(f"{v:18s} {ms:9.2f} {ratio:>9s}   rounds: {' '.join(f'{t:.2f}' for t in times[v])}")


if __name__ == "__main__":
    main()
