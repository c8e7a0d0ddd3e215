"""Speed of one MoE layer, forward + backward: ours vs DeepSpeed's MoE vs torchtitan's algorithm vs a
plain loop over experts.

Every variant uses the same router weights and expert weights (SwiGLU, no bias) and the same tokens,
dropless (DeepSpeed: its own gate with capacity factor 1.25, so its routing differs). Timed: the
median of ``--reps`` forward+backward passes after ``--warmup``, with CUDA events on a GPU, the
gradients freed after each pass as ``zero_grad(set_to_none=True)`` does between training steps; peak
memory: ``max_memory_allocated`` above the weights and inputs.

- ``ours``: :class:`sparsetrain.moe.MoE` (sorted dispatch, ``torch._grouped_mm`` in bf16 on sm90).
- ``loop``: for each expert, ``nonzero`` of its tokens, its MLP, ``index_add_`` into the output.
- ``deepspeed``: DeepSpeed 0.19.8's ``deepspeed.moe.layer.MoE`` (its ``TopKGate``, capacity factor 1.25,
  einsum dispatch, a Python loop over its experts), on the same router and expert weights, when
  ``deepspeed`` imports (``--deepspeed on`` insists; offline, install it from a directory of wheels:
  ``python3 -m pip install --no-index --find-links DIR deepspeed==0.19.8``, DeepSpeed's own wheel built
  with ``pip wheel --no-deps --no-build-isolation``). It runs in a process group of one rank
  (``deepspeed.init_distributed``, NCCL on a GPU, gloo on the CPU).
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
import os
import socket
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


class _SwiGLUExpert(torch.nn.Module):
    """One expert as DeepSpeed takes it (it deep-copies it E times)."""

    def __init__(self, d, f):
        super().__init__()
        self.w1 = torch.nn.Linear(d, f, bias=False)
        self.w3 = torch.nn.Linear(d, f, bias=False)
        self.w2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _init_one_rank_group(device):
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def deepspeed_layer(layer: MoE, device, dtype):
    """DeepSpeed's MoE with ``layer``'s router and expert weights (capacity factor 1.25, its own gate)."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    _init_one_rank_group(device)
    ex = layer.experts
    d, f, E, k = layer.d_model, ex.d_hidden, layer.num_experts, layer.k
    ds = DeepSpeedMoE(hidden_size=d, expert=_SwiGLUExpert(d, f), num_experts=E, ep_size=1, k=k,
                      capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True)
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight_ED.float())
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.w1.weight.copy_(ex.w1_EFD[e].float())
            expert.w3.weight.copy_(ex.w3_EFD[e].float())
            expert.w2.weight.copy_(ex.w2_EDF[e].float())
    ds = ds.to(device=device, dtype=dtype)
    ds.deepspeed_moe.gate.wg.float()  # DeepSpeed's gate runs in fp32
    return lambda x: ds(x)[0], ds


def _free_grads(x, params):
    """As ``optimizer.zero_grad(set_to_none=True)`` between training steps: no gradient accumulates."""
    x.grad = None
    for p in params:
        p.grad = None


def _time(fn, x, reps, warmup, device, params):
    for _ in range(warmup):
        fn(x).float().sum().backward()
        _free_grads(x, params)
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
        _free_grads(x, params)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=["a", "b"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny shape, fp32, 2 reps")
    ap.add_argument("--deepspeed", choices=["auto", "on", "off"], default="auto",
                    help="time DeepSpeed's MoE: when it imports (auto), always (on: fail if it does not), never")
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
    ds_note = "DeepSpeed off"
    if args.deepspeed != "off":
        try:
            import deepspeed
            import deepspeed.moe.layer  # noqa: F401

            ds_note = f"DeepSpeed {deepspeed.__version__} (capacity factor 1.25, its own gate)"
        except Exception as err:  # noqa: BLE001
            if args.deepspeed == "on":
                raise
            ds_note = f"DeepSpeed not importable ({type(err).__name__}: {err})"
            args.deepspeed = "off"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {dtype}; {titan_note}; {ds_note}")
    print("| shape | E, k, d, F, tokens | variant | ms (median) | time vs ours | peak MiB |")
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
        params = list(layer.parameters())
        variants = [("ours", layer, params), ("titan-copy", lambda t, m=layer: titan_copy_forward(m, t), params),
                    ("loop", lambda t, m=layer: loop_forward(m, t), params)]
        if args.deepspeed != "off":
            ds_fn, ds_module = deepspeed_layer(layer, device, dtype)
            variants.insert(1, ("deepspeed", ds_fn, list(ds_module.parameters())))
        for vname, fn, vparams in variants:
            results[vname] = _time(fn, x, args.reps, args.warmup, device, vparams)
        ours = results["ours"][0]
        for vname, (ms, peak) in results.items():
            print(f"| {name} | {s['E']}, {s['k']}, {s['d']}, {s['F']}, {s['T']} | {vname} | {ms:.2f} | "
                  f"{ms / ours:.2f}x | {peak:.0f} |")
    import torch.distributed as dist

    if dist.is_initialized():  # DeepSpeed's group: end it cleanly (an open group can abort at exit)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
