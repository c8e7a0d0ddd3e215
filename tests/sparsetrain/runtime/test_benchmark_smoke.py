import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "sparse24_speed.py"


@pytest.mark.slow
def test_benchmark_smoke_runs_every_cpu_part(capsys):
    spec = importlib.util.spec_from_file_location("sparse24_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--dtypes", "bf16", "--parts", "layer,e2e,memory,compile,fp8"]) == 0
    out = capsys.readouterr().out
    for title in ("per layer 64x64, bf16", "per layer 128x64, bf16", "end to end, prefill", "MLP-block stack",
                  "demo GPT", "memory of the loaded",
                  "compile: n/a (needs CUDA)", "fp8: n/a (needs CUDA)"):
        assert title in out
    assert "max |ours - dense|" in out and "error" not in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("8 ", "16 "))]
    assert rows and all(line.split()[-1] == "0" for line in rows)  # ours equals dense on the dense backend
