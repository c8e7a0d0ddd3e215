"""Which cuSPARSELt call forms work on this GPU: ``torch._cslt_sparse_mm`` by dtype, fused transpose,
algorithm search, bias and row count, and the public ``to_sparse_semi_structured`` path, each form
in its own process (an illegal instruction poisons the CUDA context). Prints one line per case:
ok with the largest error against a dense fp32 reference, or the error.

    python benchmarks/cslt_probe.py            # on a CUDA machine with cuSPARSELt
"""

from __future__ import annotations

import itertools
import subprocess
import sys

ROWS = (1, 8, 64, 4096)


def _case(dtype_name: str, transpose: bool, search: bool, public: bool) -> None:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    w.view(256, 128, 4)[..., 2:] = 0
    for rows, with_bias in itertools.product(ROWS, (False, True)):
        label = f"{dtype_name} transpose={transpose} search={search} public={public} rows={rows} bias={with_bias}"
        x = torch.randn(rows, 512, device="cuda", dtype=dtype)
        bias = torch.randn(256, device="cuda", dtype=dtype) if with_bias else None
        want = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        try:
            if public:
                from torch.sparse import to_sparse_semi_structured
                got = F.linear(x, to_sparse_semi_structured(w), bias)
            else:
                packed = torch._cslt_compress(w)
                xp = F.pad(x, (0, 0, 0, (-rows) % 8))
                alg = int(torch._cslt_sparse_mm_search(packed, xp.t(), bias=bias, transpose_result=transpose)) \
                    if search else 0
                y = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=transpose, alg_id=alg)
                got = (y if transpose else y.t())[:rows]
            torch.cuda.synchronize()
            err = (got.float() - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            print(f"ok   {label}: shape {tuple(got.shape)}, max rel err {err:.2e}", flush=True)
        except Exception as e:  # report and stop this process: the context may be gone
            print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            return


def main() -> int:
    if len(sys.argv) > 1:
        d, t, s, p = sys.argv[1:5]
        _case(d, t == "1", s == "1", p == "1")
        return 0
    import torch
    version = torch.backends.cusparselt.version()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuSPARSELt {version}")
    for d in ("bfloat16", "float16"):
        forms = [(t, s, "0") for t in "10" for s in "01"] + [("0", "0", "1")]
        for t, s, p in forms:
            r = subprocess.run([sys.executable, __file__, d, t, s, p], capture_output=True, text=True, timeout=120)
            print(r.stdout, end="")
            if r.returncode:
                print(f"  (exit {r.returncode}: {r.stderr.strip().splitlines()[-1][:160] if r.stderr.strip() else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
