"""Speed of one MoE layer, forward + backward: ours vs a plain loop over experts vs torchtitan's algorithm
(vs DeepSpeed's MoE when it can be imported).

Every variant uses the same router weights and expert weights (SwiGLU, no bias) and the same tokens,
dropless (DeepSpeed: its own gate with capacity factor 1.25, so its routing differs). Timed: the
median of ``--reps`` forward+backward passes after ``--warmup``, with CUDA events on a GPU; peak
memory: ``max_memory_allocated`` above the weights and inputs.

- ``ours``: :class:`sparsetrain.moe.MoE` (sorted dispatch, ``torch._grouped_mm`` in bf16 on sm90).
- ``loop``: for each expert, ``nonzero`` of its tokens, its MLP, ``index_add_`` into the output.
- ``titan``: torchtitan 0.3.0's ``models/common/moe`` if importable, else ``titan-copy``: a copy of its
  algorithm written here (argsort of the flat expert ids, gather, ``torch._grouped_mm`` with the
  cumulative counts as offsets, scores multiplied in, ``scatter_add_`` back), said so in the output.

    PYTHONPATH=. python benchmarks/moe_speed.py --smoke                 # CPU, tiny, checks agreement
    PYTHONPATH=. python benchmarks/moe_speed.py --device cuda           # shapes (a) and (b) of issue 18

Goals (issue 18): >= 3x DeepSpeed at (a), >= 1.3x at (b); >= 1.0x torchtitan at both; peak activation
memory <= torchtitan's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparsetrain.moe import MoE  # noqa: E402

SHAPES = {"a": dict(E=128, k=8, d=2048, F=768, T=16384), "b": dict(E=8, k=2, d=4096, F=14336, T=8192)}
SMOKE = {"smoke": dict(E=4, k=2, d=64, F=128, T=256)}


def _swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def loop_forward(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The plain loop over experts, on the same routing as ``layer``."""
    r = layer.router(x_TD)
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for e in range(layer.num_experts):
        t_idx, slot = torch.nonzero(r.indices_TK == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        y = _swiglu(x_TD[t_idx], ex.w1_EFD[e], ex.w3_EFD[e], ex.w2_EDF[e])
        out.index_add_(0, t_idx, (y.float() * r.gates_TK[t_idx, slot, None]).to(y.dtype))
    return out


def _titan_grouped_mm(x, w_EDF, offs):
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, w_EDF, offs=offs)
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w_EDF[e])
        start = end
    return torch.cat(out)


def titan_copy_forward(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """torchtitan's algorithm (a copy written here): argsort, gather, grouped GEMMs, scatter-add."""
    r = layer.router(x_TD)
    ex = layer.experts
    T, K = r.indices_TK.shape
    flat = r.indices_TK.reshape(-1)
    counts = torch.histc(flat.float(), bins=layer.num_experts, min=0, max=layer.num_experts)
    order = torch.argsort(flat, stable=True)
    token = order // K
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x_TD[token]
    h = F.silu(_titan_grouped_mm(xs, ex.w1_EFD.transpose(-2, -1), offs)) * \
        _titan_grouped_mm(xs, ex.w3_EFD.transpose(-2, -1), offs)
    ys = _titan_grouped_mm(h, ex.w2_EDF.transpose(-2, -1), offs)
    ys = (ys.float() * r.gates_TK.reshape(-1)[order, None]).to(ys.dtype)
    out = torch.zeros_like(x_TD)
    return out.scatter_add(0, token[:, None].expand(-1, x_TD.shape[1]), ys)


def _time(fn, x, reps, warmup, device):
    for _ in range(warmup):
        fn(x).float().sum().backward()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x).float().sum().backward()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(x).float().sum().backward()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["a", "b"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny shape, fp32, 2 reps")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = SMOKE if args.smoke else {s: SHAPES[s] for s in args.shapes}
    if args.smoke:
        args.reps, args.warmup = 2, 1
        torch.set_num_threads(1)  # a shared 2-core machine: more threads only oversubscribe
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        import torchtitan.models.common.moe  # noqa: F401
        titan_note = "torchtitan imports, but this script times titan-copy (same weights and routing)"
    except Exception as err:  # noqa: BLE001
        titan_note = f"torchtitan not importable ({type(err).__name__}); titan-copy is a copy of its algorithm"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {dtype}; {titan_note}; DeepSpeed not run by this script")
    print("| shape | E, k, d, F, tokens | variant | ms (median) | vs ours | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, s in shapes.items():
        torch.manual_seed(0)
        layer = MoE(s["d"], s["F"], s["E"], s["k"], activation="swiglu", dropless=True, aux_loss_coef=0,
                    z_loss_coef=0).to(device=device, dtype=dtype)
        x = torch.randn(s["T"], s["d"], device=device, dtype=dtype, requires_grad=True)
        with torch.no_grad():  # the three agree on these weights and tokens
            ref = layer(x).float()
            for f in (loop_forward, titan_copy_forward):
                err = (f(layer, x).float() - ref).abs().max().item() / ref.abs().max().item()
                assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), (f.__name__, err)
        results = {}
        for vname, fn in (("ours", layer), ("titan-copy", lambda t, m=layer: titan_copy_forward(m, t)),
                          ("loop", lambda t, m=layer: loop_forward(m, t))):
            results[vname] = _time(fn, x, args.reps, args.warmup, device)
            layer.zero_grad(set_to_none=True)
            x.grad = None
        ours = results["ours"][0]
        for vname, (ms, peak) in results.items():
            print(f"| {name} | {s['E']}, {s['k']}, {s['d']}, {s['F']}, {s['T']} | {vname} | {ms:.2f} | "
                  f"{ms / ours:.2f}x | {peak:.0f} |")


if __name__ == "__main__":
    main()
