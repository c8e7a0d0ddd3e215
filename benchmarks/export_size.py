"""Size of a 2:4 export (sparse-24-bitmask safetensors) against the dense bf16 weights, on the CPU.

For each case the weights are made exactly 2:4 (magnitude mask of random weights), exported with
``save_24(..., dtype=torch.bfloat16)`` and loaded back (bit for bit checked), and the bytes compared:

- per layer: the Linear shapes of the GPU benchmarks (4096x4096, 11008x4096, 4096x11008); the
  2:4 layer's stored bytes (values + bitmask + shape) against its bf16 dense bytes, and the
  export's file size against a dense bf16 safetensors file of the same weight;
- whole models: the quickstart demo GPT (MLPs 2:4) and the demo GPT at GPT-2-medium widths
  (d_model 1024, 4 blocks; MLPs 2:4): the 2:4 layers, and the whole model's files, against dense.

The goal (issue 17): the 2:4 layers' export <= 0.57x of their bf16 dense size.

    PYTHONPATH=. python benchmarks/export_size.py [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from sparsetrain.demo.model import GPT, GPTConfig  # noqa: E402
from sparsetrain.export import load_24, save_24  # noqa: E402
from sparsetrain.nm import nm_exact  # noqa: E402


def _make_24(model: nn.Module, include: str) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and include in name:
                mod.weight.copy_(nm_exact(mod.weight, 2, 4))


def _dense_file_bytes(model: nn.Module, tmp: Path) -> int:
    state = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    path = tmp / "dense.safetensors"
    save_file(state, path)
    return path.stat().st_size


def measure(name: str, model: nn.Module, targets: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        out = save_24(model, tmp / "export", targets=targets, dtype=torch.bfloat16)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_24(tmp / "export")
        t_load = time.perf_counter() - t0
        for k, v in model.state_dict().items():
            assert torch.equal(loaded[k], v.to(torch.bfloat16)), k
        dense_file = _dense_file_bytes(model, tmp)
    return dict(name=name, layers=len(out.targets), sparse=out.sparse_bytes, sparse_dense=out.sparse_dense_bytes,
                files=out.file_bytes, dense_file=dense_file, save_s=t_save, load_s=t_load)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small shapes only (a quick check)")
    args = p.parse_args()
    torch.manual_seed(0)
    shapes = [(256, 256), (688, 256)] if args.smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]
    rows = []
    for out_f, in_f in shapes:
        layer = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
        _make_24(layer, "0")
        rows.append(measure(f"Linear {out_f}x{in_f}", layer, ["0"]))
    gpts = [("demo GPT (quickstart)", GPTConfig(d_model=128, n_layer=2, n_head=2))]
    if not args.smoke:
        gpts.append(("demo GPT at GPT-2-medium widths, 4 blocks", GPTConfig(d_model=1024, n_layer=4, n_head=16)))
    for name, cfg in gpts:
        model = GPT(cfg)
        _make_24(model, ".mlp.")
        rows.append(measure(name, model, ["*.mlp.*"]))
    print(f"torch {torch.__version__}, bf16 export; sizes in MB (1e6 bytes)")
    print(f"{'case':44s} {'2:4 layers':>10s} {'stored':>9s} {'bf16':>9s} {'ratio':>7s} | {'files':>9s} "
          f"{'dense file':>10s} {'ratio':>7s} | {'save s':>7s} {'load s':>7s}")
    for r in rows:
        print(f"{r['name']:44s} {r['layers']:10d} {r['sparse'] / 1e6:9.3f} {r['sparse_dense'] / 1e6:9.3f} "
              f"{r['sparse'] / r['sparse_dense']:6.4f}x | {r['files'] / 1e6:9.3f} {r['dense_file'] / 1e6:10.3f} "
              f"{r['files'] / r['dense_file']:6.4f}x | {r['save_s']:7.2f} {r['load_s']:7.2f}")
    worst = max(r["sparse"] / r["sparse_dense"] for r in rows)
    verdict = "met" if worst <= 0.57 else "MISSED"
    print(f"goal: 2:4 layers <= 0.57x of bf16 dense; worst measured {worst:.4f}x: {verdict}")


if __name__ == "__main__":
    main()
