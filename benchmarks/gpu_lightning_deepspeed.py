"""DynamicSparsity under Lightning's DeepSpeedStrategy (ZeRO 1 and 2) on GPUs.

Lightning refuses DeepSpeed on CPU, so this runs only where CUDA is present (the lent GPU
machine). For each ZeRO stage it trains the demo GPT with RigL at 80% sparsity in bf16
through ``sparsetrain.train.train`` and, at the end, gathers every sparsified weight's
fp32 MASTER copy from DeepSpeed (``safe_get_full_fp32_param``) and counts its nonzeros
outside the mask: the module's bf16 weights being masked is not enough under ZeRO.

    python benchmarks/gpu_lightning_deepspeed.py --devices 2 --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch
from lightning.pytorch.callbacks import Callback


class _MasterCheck(Callback):
    """Counts master-weight nonzeros outside the masks at the end of training."""

    def __init__(self) -> None:
        self.result: dict = {}

    def on_train_end(self, trainer, pl_module) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        ds = next(c for c in trainer.callbacks if type(c).__name__ == "DynamicSparsity")
        sp = ds.sparsifier
        outside = checked = total = active = 0
        params = dict(pl_module.named_parameters())
        for name, mask in sp.masks().items():
            weight = params[name]
            master = safe_get_full_fp32_param(weight)
            if master is None:
                continue
            checked += 1
            outside += int((master.reshape(mask.shape)[~mask] != 0).sum())
            module_outside = int((weight.detach()[~mask] != 0).sum())
            outside += module_outside
            total += mask.numel()
            active += int(mask.sum())
        self.result = {
            "layers_checked": checked,
            "nonzeros_outside_mask": outside,
            "sparsity": 1 - active / max(total, 1),
            "master_dtype": "fp32",
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: Lightning's DeepSpeedStrategy needs CUDA")
        return 0
    from sparsetrain.recipe import parse_recipe
    from sparsetrain.train import train

    rows = []
    for stage in args.stages:
        recipe = parse_recipe({
            "version": 1,
            "name": f"deepspeed-zero{stage}",
            "model": {"name": "gpt", "d_model": 256, "n_layer": 4, "n_head": 4, "block_size": 128},
            "data": {"name": "stdlib_chars", "batch_size": 32},
            "trainer": {"accelerator": "gpu", "devices": args.devices, "strategy": "deepspeed",
                        "deepspeed_stage": stage, "precision": "bf16-mixed", "max_steps": args.steps,
                        "val_check_interval": args.steps, "limit_val_batches": 5, "deterministic": False},
            "optimizer": {"name": "adamw", "lr": 0.002},
            "callbacks": [{"name": "dynamic_sparsity", "method": "rigl", "sparsity": 0.8,
                           "update_every": max(1, args.steps // 6)}],
        })
        check = _MasterCheck()
        with tempfile.TemporaryDirectory() as out:
            summary = train(recipe, out, extra_callbacks=[check], report=False, resume=False)
        rows.append({"stage": stage, "steps": summary["steps"], "val_loss": round(summary["final_val_loss"], 4),
                     **check.result})
    import lightning.fabric.utilities.rank_zero as rz

    if rz.rank_zero_only.rank == 0:
        print("| ZeRO stage | steps | val loss | layers checked | sparsity | nonzeros outside mask (master + module) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['stage']} | {r['steps']} | {r['val_loss']} | {r['layers_checked']} | "
                  f"{r['sparsity']:.3f} | {r['nonzeros_outside_mask']} |")
        print(json.dumps(rows))
    return 0 if all(r.get("nonzeros_outside_mask", 1) == 0 and r.get("layers_checked") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
