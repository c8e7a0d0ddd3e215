"""Where shape (b)'s time goes: ``torch._grouped_mm`` against cuBLAS for the experts' GEMMs (GPU only).

Issue 18's shape (b) (E=8, d=4096, F=14336, 8192 tokens x top-2 = 16384 rows, 2048 per expert): each
GEMM of the SwiGLU experts timed as a grouped GEMM (both weight layouts), as a loop of cuBLAS ``mm``
over equal splits (the split sizes known on the host, which the layer does not have without a
sync), as one ``bmm`` and as one ``mm`` of all rows; then the experts' forward + backward alone,
with ``w1``/``w3`` separate or fused into one ``[E, 2F, D]`` weight. TFLOP/s counts useful FLOPs.

    python3 benchmarks/moe_gemm_probe.py
"""

import torch
import torch.nn.functional as F

E, D, FH, T = 8, 4096, 14336, 16384


def _ms(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def _split(t, e):
    return t[e * (T // E):(e + 1) * (T // E)]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("moe_gemm_probe: needs CUDA")
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=bf)
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (T // E)
    w_EFD = torch.randn(E, FH, D, device=dev, dtype=bf) * 0.01
    w_EDF = w_EFD.transpose(-2, -1).contiguous()
    g = torch.randn(T, FH, device=dev, dtype=bf)
    gflop = 2 * T * D * FH / 1e9
    cases = [
        ("fwd grouped x@w_EFD^T (col-major B)", lambda: torch._grouped_mm(x, w_EFD.transpose(-2, -1), offs=offs)),
        ("fwd grouped x@w_EDF (row-major B)", lambda: torch._grouped_mm(x, w_EDF, offs=offs)),
        ("fwd loop mm per expert (equal splits)", lambda: [_split(x, e) @ w_EFD[e].t() for e in range(E)]),
        ("fwd bmm [E,T/E,D]x[E,D,F]", lambda: torch.bmm(x.view(E, T // E, D), w_EFD.transpose(-2, -1))),
        ("fwd one mm [T,D]x[D,F]", lambda: x @ w_EFD[0].t()),
        ("bwd dW grouped x^T@g jagged K", lambda: torch._grouped_mm(x.t(), g, offs=offs)),
        ("bwd dW grouped g^T@x jagged K", lambda: torch._grouped_mm(g.t(), x, offs=offs)),
        ("bwd dW loop mm", lambda: [_split(g, e).t() @ _split(x, e) for e in range(E)]),
        ("bwd dX grouped g@w_EFD", lambda: torch._grouped_mm(g, w_EFD, offs=offs)),
        ("bwd dX loop mm", lambda: [_split(g, e) @ w_EFD[e] for e in range(E)]),
    ]
    for name, fn in cases:
        ms = _ms(fn)
        print(f"{name:44s} {ms:7.3f} ms  {gflop / ms:6.0f} TFLOP/s")
    for layout in ("EFD", "EDF"):  # the experts' forward + backward alone, w1/w3 separate and fused
        w1, w3 = (torch.randn(E, FH, D, device=dev, dtype=bf) for _ in range(2))
        w2 = torch.randn(E, D, FH, device=dev, dtype=bf)
        if layout == "EDF":
            w1, w3, w2 = (w.transpose(-2, -1).contiguous() for w in (w1, w3, w2))

            def mm(a, w):
                return torch._grouped_mm(a, w, offs=offs)
        else:
            def mm(a, w):
                return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        w13 = torch.cat([w1, w3], dim=1 if layout == "EFD" else 2).requires_grad_()
        w1, w3, w2 = (w.requires_grad_() for w in (w1, w3, w2))
        xr = x.clone().requires_grad_()

        def separate():
            mm(F.silu(mm(xr, w1)) * mm(xr, w3), w2).float().sum().backward()  # noqa: B023

        def fused():
            a, b = mm(xr, w13).chunk(2, dim=-1)  # noqa: B023
            mm(F.silu(a) * b, w2).float().sum().backward()  # noqa: B023

        for label, fn in (("", separate), ("fused w13 ", fused)):
            ms = _ms(fn, 5)
            print(f"swiglu {label}fwd+bwd layout {layout}: {ms:.2f} ms ({9 * gflop / ms:.0f} TFLOP/s useful)")


if __name__ == "__main__":
    main()
