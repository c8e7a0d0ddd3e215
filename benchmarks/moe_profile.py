"""Kernel-time breakdown of one MoE layer's forward + backward: ours against DeepSpeed's (GPU only).

The layers, weights and tokens of ``benchmarks/moe_speed.py`` at one of its shapes (default b), three
passes after three warm-up passes under ``torch.profiler``, the kernels sorted by their own device
time: how much is the experts' GEMMs and how much everything else (routing, permutation, SwiGLU,
combine). Gradients are freed after each pass, as in ``moe_speed.py``.

    python3 benchmarks/moe_profile.py [--shape a|b]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moe_speed  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from sparsetrain.moe import MoE  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(moe_speed.SHAPES), default="b")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_profile: needs CUDA")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    s = moe_speed.SHAPES[args.shape]
    torch.manual_seed(0)
    layer = MoE(s["d"], s["F"], s["E"], s["k"], activation="swiglu", dropless=True, aux_loss_coef=0,
                z_loss_coef=0).to(dev, dtype)
    x = torch.randn(s["T"], s["d"], device=dev, dtype=dtype, requires_grad=True)
    ds_fn, ds_module = moe_speed.deepspeed_layer(layer, dev, dtype)
    for name, fn, params in (("ours", layer, list(layer.parameters())),
                             ("deepspeed", ds_fn, list(ds_module.parameters()))):
        for _ in range(3):
            fn(x).float().sum().backward()
            moe_speed._free_grads(x, params)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn(x).float().sum().backward()
                moe_speed._free_grads(x, params)
            torch.cuda.synchronize()
        print(f"==== {name} (3 passes)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
