"""2:4 inference speed and memory: sparsetrain.runtime against dense and PyTorch's eager semi-structured path.

Parts (``--parts``, default ``layer,e2e,memory``; ``--fp8`` adds ``fp8``, ``compile`` is opt-in):

- ``layer``: one Linear (out x in) per dtype and token count, ms per call (CUDA events):
  ``ours`` = :class:`sparsetrain.runtime.Sparse24Linear` dispatched by this GPU's table and timed
  inside a CUDA graph (``ours eager``: the same module called eagerly); ``2:4 raw``: the module
  forced to 2:4 (graph); ``torch eager``: ``F.linear(x, to_sparse_semi_structured(W))``;
  ``dense eager``: the ``nn.Linear`` module that ``ours`` replaces, called eagerly (module against
  module: at a few tokens an eager call is host-bound); ``dense graph``: ``F.linear`` in a CUDA
  graph. Ratios are speed-ups (dense ms / ours ms).
- ``e2e``: prefill (batch 1) of a GPT MLP-block stack (``x + fc_out(gelu(fc_in(ln(x))))``, d 4096,
  hidden 11008, 8 blocks, every Linear 2:4) and of the demo GPT at GPT-2-medium widths (d_model
  1024, 24 layers, 16 heads, its MLP weights 2:4, attention dense), dense vs ours, eager and through
  :func:`sparsetrain.runtime.capture` (one CUDA graph per token count; the call includes copying
  the input in and the output out).
- ``memory``: GPU bytes of the 2:4 layers and of the whole demo GPT after loading, dense vs
  ``sparsify_model(backend="cusparselt")`` (2:4 only) vs ``backend="auto"`` (dense copies kept where
  the table runs dense, at ``min_tokens`` 1 and 512).
- ``compile``: ``torch.compile(mode="reduce-overhead")`` of the MLP stack (dense and ours) at one
  token count, against ``capture``: does compiling remove the host overhead too?
- ``fp8``: e4m3 2:4 through ``torch._cslt_sparse_mm(..., out_dtype=torch.bfloat16)``: speed against
  bf16 2:4 and dense, and the error against the dequantized product, or the error cuSPARSELt raised.

    PYTHONPATH=. python benchmarks/sparse24_speed.py                    # the full run (H100: ~6 min)
    PYTHONPATH=. python benchmarks/sparse24_speed.py --quick            # fewer reps, shapes and counts
    PYTHONPATH=. python benchmarks/sparse24_speed.py --parts layer --shapes 4096x4096 --tokens 4096 --dtypes bf16
    PYTHONPATH=. python benchmarks/sparse24_speed.py --fp8 --parts layer
    PYTHONPATH=. python benchmarks/sparse24_speed.py --smoke            # tiny, on CPU (backend="dense")

Goals (issue 17, H100): >= 1.3x dense for the MLP-block linears (11008x4096, 4096x11008) at >= 4096
tokens; >= 1.2x end to end on the MLP-block stack; never below 0.97x dense (dispatch keeps dense
where 2:4 loses); >= 2x PyTorch's eager semi-structured path; GPU memory of the 2:4 layers <= 0.6x
dense. Speed-ups against dense use dense in the same mode (graph against graph, eager against eager).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sparsetrain.demo.model import GPT, GPTConfig  # noqa: E402
from sparsetrain.runtime import (  # noqa: E402
    DispatchTable,
    LayerPlan,
    Sparse24Linear,
    _cslt,  # noqa: E402
    capture,
    sparse_layers,
    sparsify_model,
)
from sparsetrain.runtime.timing import cuda_ms  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (16384, 16384))
MLP_SHAPES = ((11008, 4096), (4096, 11008))
TOKENS = (1, 16, 512, 4096, 16384)
E2E_TOKENS = (512, 1024, 2048, 4096, 8192)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GOAL_MLP, GOAL_E2E, GOAL_FLOOR, GOAL_TORCH, GOAL_MEMORY = 1.3, 1.2, 0.97, 2.0, 0.6


# ---------------------------------------------------------------------------------------------- helpers
def make_24(weight_OI: torch.Tensor) -> torch.Tensor:
    """``weight_OI`` with the 2 smallest magnitudes of every group of 4 along the input dim zeroed."""
    out_f, in_f = weight_OI.shape
    groups = weight_OI.detach().reshape(out_f, in_f // 4, 4)
    drop = groups.abs().float().argsort(dim=-1)[..., :2]
    return groups.scatter(-1, drop, 0).reshape(out_f, in_f)


def to_24_(model: nn.Module, names) -> None:
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            layer.weight.copy_(make_24(layer.weight))


class MLPStack(nn.Module):
    """``blocks`` GPT MLP blocks: ``x + fc_out(gelu(fc_in(ln(x))))``; ``forward(x_BTD)``."""

    def __init__(self, d: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(d), "fc_in": nn.Linear(d, hidden), "fc_out": nn.Linear(hidden, d)})
            for _ in range(blocks))
        for block in self.blocks:
            nn.init.normal_(block["fc_in"].weight, std=d ** -0.5)
            nn.init.normal_(block["fc_out"].weight, std=hidden ** -0.5 / blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["fc_out"](F.gelu(b["fc_in"](b["ln"](x))))
        return x


class Timer:
    """ms per call: CUDA events on a GPU (eager, or inside a CUDA graph), wall clock on the CPU."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def __call__(self, fn, *, graph: bool = False) -> float | None:
        if self.device.type == "cuda":
            return cuda_ms(fn, reps=self.reps, graph=graph)
        if graph:
            return None
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(self.reps):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / self.reps)
        return min(times)


def attempt(fn):
    """``fn()``, or the first line of the error it raised (a figure that could not be measured)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a benchmark reports what failed and goes on
        return f"error: {type(err).__name__}: {str(err).strip().splitlines()[0][:100]}"


def ms(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return "err"
    return f"{v:.3f}"


def ratio(num, den, goal: float | None = None) -> str:
    if not isinstance(num, float) or not isinstance(den, float):
        return "n/a"
    r = num / den
    if goal is None:
        return f"{r:.2f}x"
    return f"{r:.2f}x {'ok' if r >= goal else 'MISS'}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def errors_of(results: dict) -> list[str]:
    return [f"  {k}: {v}" for k, v in results.items() if isinstance(v, str)]


# ---------------------------------------------------------------------------------------------- parts
def part_layer(args, device, table, timer) -> None:
    backend = "auto" if device.type == "cuda" else "dense"
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        rows, errors = [], []
        for out_f, in_f in args.shapes:
            weight = make_24(torch.randn(out_f, in_f, generator=gen)).to(device, dtype)
            lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(weight)
            if backend == "auto":
                table.measure([((out_f, in_f), dtype)], device=device)
                plan = table.plan((out_f, in_f), dtype)
                ours = Sparse24Linear.from_linear(lin, plan=plan)
                everywhere = (True,) * len(plan.buckets)  # the same algorithms, 2:4 at every token count
                raw = Sparse24Linear.from_linear(lin, keep_dense=False, plan=LayerPlan(
                    buckets=plan.buckets, sparse_eager=everywhere, sparse_graph=everywhere, alg_ids=plan.alg_ids))
                semi = attempt(lambda: torch.sparse.to_sparse_semi_structured(weight))  # noqa: B023
            else:
                ours = Sparse24Linear.from_linear(lin, backend="dense")
                raw, semi = None, None
            mlp = (out_f, in_f) in MLP_SHAPES
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, generator=gen).to(device, dtype)
                with torch.no_grad():
                    r = {
                        "dense eager": attempt(lambda: timer(lambda: lin(x))),  # noqa: B023
                        "dense graph": attempt(lambda: timer(lambda: F.linear(x, weight), graph=True)),  # noqa: B023
                        "ours eager": attempt(lambda: timer(lambda: ours(x))),  # noqa: B023
                        "ours graph": attempt(lambda: timer(lambda: ours(x), graph=True)),  # noqa: B023
                        "2:4 raw": None if raw is None else attempt(
                            lambda: timer(lambda: raw(x), graph=True)),  # noqa: B023
                        "torch eager": semi if not isinstance(semi, torch.Tensor) else attempt(
                            lambda: timer(lambda: F.linear(x, semi))),  # noqa: B023
                    }
                if device.type == "cuda" and isinstance(r["ours graph"], float):
                    with torch.no_grad():  # check the dispatched output against dense once per row
                        err = (ours(x).float() - F.linear(x, weight).float()).abs().max().item()
                        scale = F.linear(x, weight).float().abs().max().item() or 1.0
                    if err > 2e-2 * scale:
                        r["ours graph"] = f"error: output differs from dense by {err:.3g} (max |y| {scale:.3g})"
                errors.extend(f"  {out_f}x{in_f} T={tokens} {k}: {v}" for k, v in r.items() if isinstance(v, str))
                goal_g = GOAL_MLP if mlp and tokens >= 4096 else GOAL_FLOOR
                rows.append([
                    f"{out_f}x{in_f}", tokens, ms(r["ours graph"]), ms(r["ours eager"]), ms(r["2:4 raw"]),
                    ms(r["torch eager"]), ms(r["dense eager"]), ms(r["dense graph"]),
                    "sparse" if ours.uses_sparse(tokens, graph=True) else "dense",
                    ratio(r["dense graph"], r["ours graph"], goal_g), f">={goal_g}",
                    ratio(r["dense eager"], r["ours eager"], GOAL_FLOOR),
                    ratio(r["torch eager"], r["ours graph"], GOAL_TORCH),
                ])
            # one table per shape, printed as soon as it is measured (a long run keeps what it has)
            print_table(
                f"per layer {out_f}x{in_f}, {dname} (ms per call; speed-ups = dense ms / ours ms, graph vs graph, "
                "eager vs eager)",
                ["out x in", "tokens", "ours graph", "ours eager", "2:4 raw", "torch eager", "dense eager",
                 "dense graph", "picks", "vs dense graph", "goal", "vs dense eager (>=0.97)", "vs torch eager (>=2)"],
                rows)
            if errors:
                print("errors:\n" + "\n".join(errors))
            rows, errors = [], []
            weight = lin = ours = raw = semi = None  # free before the next shape
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _gpt_medium(device, dtype, *, smoke: bool) -> GPT:
    cfg = (GPTConfig(d_model=128, n_layer=2, n_head=2, block_size=64) if smoke
           else GPTConfig(d_model=1024, n_layer=24, n_head=16, block_size=8192))
    torch.manual_seed(0)
    model = GPT(cfg).to(device, dtype)
    to_24_(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n])
    return model.eval()


def _mlp_stack(device, dtype, *, smoke: bool, blocks: int) -> MLPStack:
    torch.manual_seed(0)
    model = (MLPStack(64, 128, 2) if smoke else MLPStack(4096, 11008, blocks)).to(device, dtype)
    to_24_(model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    return model.eval()


def part_e2e(args, device, table, timer) -> None:
    dtype = DTYPES[args.dtypes[0]]
    backend = "auto" if device.type == "cuda" else "dense"
    tokens_list = args.e2e_tokens
    for name, build, make_input in (
        (f"MLP-block stack (d 4096, hidden 11008, {args.blocks} blocks)",
         lambda: _mlp_stack(device, dtype, smoke=args.smoke, blocks=args.blocks),
         lambda m, t: torch.randn(1, t, m.blocks[0]["ln"].normalized_shape[0], device=device, dtype=dtype)),
        ("demo GPT, GPT-2-medium widths (d_model 1024, 24 layers, 16 heads), 2:4 MLP weights",
         lambda: _gpt_medium(device, dtype, smoke=args.smoke),
         lambda m, t: torch.randint(0, m.cfg.vocab_size, (1, t), device=device)),
    ):
        if args.smoke:
            name = name.split(" (")[0] + " (smoke size)"
        goal = GOAL_E2E if name.startswith("MLP") else GOAL_FLOOR
        dense = build()
        ours = sparsify_model(build(), backend=backend, table=table if backend == "auto" else None,
                              ignore=("*attn*", "lm_head"))
        kinds = sorted(set(sparse_layers(ours).values()))
        rows, errors = [], []
        captured = {}
        if device.type == "cuda":
            example = make_input(dense, tokens_list[0])
            for label, model in (("dense", dense), ("ours", ours)):
                captured[label] = attempt(lambda: capture(model, example, token_counts=tokens_list,  # noqa: B023
                                                          token_dim=1))
        for t in tokens_list:
            x = make_input(dense, t)
            with torch.no_grad():
                r = {
                    "dense eager": attempt(lambda: timer(lambda: dense(x))),  # noqa: B023
                    "ours eager": attempt(lambda: timer(lambda: ours(x))),  # noqa: B023
                }
                for label in ("dense", "ours"):
                    c = captured.get(label)
                    r[f"{label} captured"] = (None if c is None else c if isinstance(c, str)
                                              else attempt(lambda: timer(lambda: c(x))))  # noqa: B023
                # ours (captured where it could be) against eager dense
                run = captured["ours"] if isinstance(captured.get("ours"), nn.Module) else ours
                diff = attempt(lambda: (run(x).float() - dense(x).float()).abs().max().item())  # noqa: B023
                if isinstance(diff, float):
                    r["max |ours - dense|"] = diff
            errors.extend(f"  T={t} {k}: {v}" for k, v in r.items() if isinstance(v, str))
            rows.append([t, ms(r["dense eager"]), ms(r["ours eager"]), ms(r["dense captured"]),
                         ms(r["ours captured"]), ratio(r["dense eager"], r["ours eager"], GOAL_FLOOR),
                         ratio(r["dense captured"], r["ours captured"], goal), f">={goal}",
                         ratio(r["dense eager"], r["ours captured"]),
                         "n/a" if "max |ours - dense|" not in r else f"{r['max |ours - dense|']:.3g}"])
        print_table(f"end to end, prefill, batch 1, {args.dtypes[0]}: {name}; layers: {', '.join(kinds)} "
                    "(ms per forward)",
                    ["tokens", "dense eager", "ours eager", "dense captured", "ours captured",
                     "eager speed-up (>=0.97)", "captured speed-up", "goal", "ours captured vs dense eager",
                     "max |ours - dense| (logits/out)"], rows)
        if errors:
            print("errors:\n" + "\n".join(errors))
        dense = ours = captured = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def part_memory(args, device, table) -> None:
    dtype = DTYPES[args.dtypes[0]]
    variants = [("dense", None, 1)]
    if device.type == "cuda":
        variants += [("2:4 (backend='cusparselt')", "cusparselt", 1), ("auto, min_tokens=1", "auto", 1),
                     ("auto, min_tokens=512", "auto", 512)]
    else:
        variants += [("backend='dense' (smoke)", "dense", 1)]
    rows = []
    base_layers = None
    for label, backend, min_tokens in variants:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        model = _gpt_medium(device, dtype, smoke=args.smoke)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mlp." in n]
        if backend is not None:
            model = sparsify_model(model, backend=backend, table=table if backend == "auto" else None,
                                   ignore=("*attn*", "lm_head"), min_tokens=min_tokens)
        layer_bytes = _bytes(b for n in names for b in model.get_submodule(n).buffers()) if backend else _bytes(
            p for n in names for p in model.get_submodule(n).parameters())
        total = _bytes([*model.parameters(), *model.buffers()])
        base_layers = base_layers or layer_bytes
        if device.type == "cuda":
            gc.collect()
            resident = torch.cuda.memory_allocated(device) - before
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            resident = peak = None
        goal = "" if backend is None else ratio(float(base_layers), float(layer_bytes), 1 / GOAL_MEMORY)
        rows.append([label, f"{layer_bytes / 2**20:.1f}", f"{layer_bytes / base_layers:.3f}x", goal,
                     f"{total / 2**20:.1f}", "n/a" if resident is None else f"{resident / 2**20:.1f}",
                     "n/a" if peak is None else f"{peak / 2**20:.1f}"])
        del model
    print_table(f"memory of the loaded demo GPT at GPT-2-medium widths, {args.dtypes[0]} (MiB; goal: 2:4 layers "
                f"<= {GOAL_MEMORY}x dense)",
                ["variant", "MLP layers", "vs dense", "dense/ours (>=1.67)", "model tensors", "GPU resident",
                 "GPU peak while loading"], rows)


def part_compile(args, device, table, timer) -> None:
    if device.type != "cuda":
        print("\ncompile: n/a (needs CUDA)")
        return
    dtype = DTYPES[args.dtypes[0]]
    t = 4096 if not args.quick else 2048
    x = torch.randn(1, t, 4096, device=device, dtype=dtype)
    rows = []
    for label, build in (("dense", lambda: _mlp_stack(device, dtype, smoke=False, blocks=args.blocks)),
                         ("ours", lambda: sparsify_model(_mlp_stack(device, dtype, smoke=False, blocks=args.blocks),
                                                         table=table))):
        model = build()
        with torch.no_grad():
            eager = attempt(lambda: timer(lambda: model(x)))  # noqa: B023
            cap = attempt(lambda: capture(model, x, token_counts=(t,), token_dim=1))  # noqa: B023
            cap_ms = cap if isinstance(cap, str) else attempt(lambda: timer(lambda: cap(x)))  # noqa: B023
            t0 = time.perf_counter()
            compiled = torch.compile(model, mode="reduce-overhead")

            def run_compiled():
                out = compiled(x)  # noqa: B023
                return out.clone()

            first = attempt(lambda: [run_compiled() for _ in range(3)])
            compile_s = time.perf_counter() - t0
            comp_ms = first if isinstance(first, str) else attempt(lambda: timer(run_compiled))
            if not isinstance(comp_ms, str) and not isinstance(first, str):
                diff = (run_compiled().float() - model(x).float()).abs().max().item()
            else:
                diff = None
        rows.append([label, ms(eager), ms(cap_ms), ms(comp_ms), f"{compile_s:.1f}",
                     ratio(eager, cap_ms), ratio(eager, comp_ms), "n/a" if diff is None else f"{diff:.3g}"])
        for v in (eager, cap_ms, comp_ms):
            if isinstance(v, str):
                print(f"  {label}: {v}")
        model = cap = compiled = None
        torch.cuda.empty_cache()
    print_table(f"torch.compile(mode='reduce-overhead') vs capture, MLP stack, {t} tokens, {args.dtypes[0]} (ms)",
                ["model", "eager", "captured", "compiled", "compile s", "captured speed-up", "compiled speed-up",
                 "max |compiled - eager|"], rows)


def part_fp8(args, device, timer) -> None:
    if device.type != "cuda":
        print("\nfp8: n/a (needs CUDA)")
        return
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    t = 4096
    for out_f, in_f in [s for s in args.shapes if s != (16384, 16384)] or args.shapes:
        w = make_24(torch.randn(out_f, in_f, generator=gen) * 0.05).to(device)
        x = torch.randn(t, in_f, generator=gen).to(device)
        w_bf, x_bf = w.to(torch.bfloat16), x.to(torch.bfloat16)
        w8, x8 = w.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)
        with torch.no_grad():
            dense_ms = attempt(lambda: timer(lambda: F.linear(x_bf, w_bf), graph=True))  # noqa: B023
            packed_bf = _cslt.compress(w_bf)
            bf_ms = attempt(lambda: timer(lambda: _cslt.linear(packed_bf, x_bf, None), graph=True))  # noqa: B023
            packed8 = attempt(lambda: _cslt.compress(w8))  # noqa: B023
            fp8_ms, err, layout = packed8, None, "-"
            if not isinstance(packed8, str):
                calls = {  # y_RO directly, or y_OR (cuSPARSELt's own row-major output) transposed
                    "y_RO": lambda: torch._cslt_sparse_mm(packed8, x8.t(), out_dtype=torch.bfloat16,  # noqa: B023
                                                          transpose_result=True),
                    "y_OR": lambda: torch._cslt_sparse_mm(packed8, x8.t(), out_dtype=torch.bfloat16).t(),  # noqa: B023
                }
                for layout, call in calls.items():  # noqa: B007
                    y8 = attempt(call)
                    if not isinstance(y8, str):
                        break
                if isinstance(y8, str):
                    fp8_ms = y8
                else:
                    ref = F.linear(x8.float(), w8.float())
                    err = ((y8.float() - ref).abs().max() / ref.abs().max()).item()
                    fp8_ms = attempt(lambda: timer(call, graph=True))  # noqa: B023
        rows.append([f"{out_f}x{in_f}", t, ms(dense_ms), ms(bf_ms), ms(fp8_ms), layout, ratio(dense_ms, fp8_ms),
                     ratio(bf_ms, fp8_ms), "n/a" if err is None else f"{err:.2e}"])
        for v in (dense_ms, bf_ms, fp8_ms):
            if isinstance(v, str):
                print(f"  fp8 {out_f}x{in_f}: {v}")
    print_table("fp8 (e4m3) 2:4 probe, graph-captured (ms); error: max |fp8 2:4 - dequantized product| / max |y|",
                ["out x in", "tokens", "dense bf16", "2:4 bf16", "2:4 fp8->bf16", "output", "vs dense bf16",
                 "vs 2:4 bf16", "rel. error"], rows)


# ---------------------------------------------------------------------------------------------- main
def _shapes(text: str):
    out = []
    for item in text.split(","):
        a, sep, b = item.strip().partition("x")
        if not sep or not a.isdigit() or not b.isdigit():
            raise argparse.ArgumentTypeError(f"shapes are OUTxIN, comma-separated, got {item!r}")
        out.append((int(a), int(b)))
    return tuple(out)


def _ints(text: str):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def _names(allowed):
    def parse(text: str):
        values = tuple(v.strip() for v in text.split(","))
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {sorted(allowed)}")
        return values
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (backend='dense'): checks the script")
    p.add_argument("--quick", action="store_true", help="fewer reps, shapes and token counts")
    p.add_argument("--shapes", type=_shapes, default=None, help="OUTxIN,... (default: the four of issue 17)")
    p.add_argument("--tokens", type=_ints, default=None, help="token counts of the layer part")
    p.add_argument("--e2e-tokens", type=_ints, default=None, help="prefill token counts of the e2e part")
    p.add_argument("--dtypes", type=_names(DTYPES), default=("bf16", "fp16"))
    p.add_argument("--parts", type=_names({"layer", "e2e", "memory", "compile", "fp8"}),
                   default=("layer", "e2e", "memory"))
    p.add_argument("--fp8", action="store_true", help="add the fp8 probe part")
    p.add_argument("--blocks", type=int, default=8, help="blocks of the MLP stack")
    p.add_argument("--reps", type=int, default=None, help="calls per timing (default 10, --quick 5)")
    p.add_argument("--table", default=None, help="dispatch table JSON to use (default: this GPU's cache file)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.shapes = args.shapes or ((64, 64), (128, 64))
        args.tokens = args.tokens or (1, 16)
        args.e2e_tokens = args.e2e_tokens or (8, 16)
        args.blocks = 2
        args.reps = args.reps or 2
        global MLP_SHAPES
        MLP_SHAPES = ((128, 64),)
    elif device.type != "cuda":
        print("sparse24_speed: needs CUDA (use --smoke on a machine without a GPU)", file=sys.stderr)
        return 2
    if args.quick:
        args.shapes = args.shapes or ((4096, 4096), (11008, 4096), (4096, 11008))
        args.tokens = args.tokens or (16, 512, 4096)
        args.e2e_tokens = args.e2e_tokens or (512, 2048, 8192)
        args.blocks = min(args.blocks, 4)
    args.shapes = args.shapes or SHAPES
    args.tokens = args.tokens or TOKENS
    args.e2e_tokens = args.e2e_tokens or E2E_TOKENS
    args.reps = args.reps or (5 if args.quick else 10)
    parts = list(args.parts) + (["fp8"] if args.fp8 and "fp8" not in args.parts else [])
    timer = Timer(device, args.reps)

    table = None
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuSPARSELt {_cslt.version()}")
        table = DispatchTable.cached(device, path=args.table)
        t0 = time.perf_counter()
        layer_shapes = [(s, DTYPES[d]) for d in args.dtypes for s in args.shapes] if "layer" in parts else []
        e2e_shapes = [(s, DTYPES[args.dtypes[0]]) for s in ((11008, 4096), (4096, 11008), (4096, 1024), (1024, 4096))]
        n = table.measure(layer_shapes + (e2e_shapes if {"e2e", "memory", "compile"} & set(parts) else []),
                          device=device, reps=max(args.reps, 5))
        print(f"dispatch table: {table.path} ({n} buckets measured in {time.perf_counter() - t0:.1f} s)")
    else:
        print(f"device: CPU (smoke: backend='dense', wall-clock ms, no CUDA graphs; the goals are for GPU runs), "
              f"torch {torch.__version__}")
    t_start = time.perf_counter()
    if "layer" in parts:
        part_layer(args, device, table, timer)
    if "e2e" in parts:
        part_e2e(args, device, table, timer)
    if "memory" in parts:
        part_memory(args, device, table)
    if "compile" in parts:
        part_compile(args, device, table, timer)
    if "fp8" in parts:
        part_fp8(args, device, timer)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
