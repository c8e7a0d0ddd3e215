import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsetrain.demo.model import GPTConfig
from sparsetrain.runtime import sparsify_model
from sparsetrain.runtime.bench import compare, example_input, format_report, layer_bytes

from .conftest import gpt_24


def _gpt():
    return gpt_24(GPTConfig(d_model=64, n_layer=1, n_head=2, block_size=32))


def test_compare_on_the_cpu_runs_the_dense_path():
    dense = _gpt()
    ours = sparsify_model(_gpt(), backend="dense", ignore=("*attn*", "lm_head"))
    result = compare(dense, ours, [4, 8], reps=1)
    assert set(result["layers"]) == {"blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out"}
    assert result["dense_bytes"] == result["ours_bytes"] == layer_bytes(dense, list(result["layers"]))
    for row in result["rows"]:
        assert row["dense_graph_ms"] is None and row["ours_eager_ms"] > 0
        assert row["max_abs_diff"] == 0.0  # the same weights through F.linear
    text = format_report(result)
    assert "2 dense" in text and "n/a" in text and text.count("\n") == 5


def test_example_input():
    x, dim = example_input(_gpt(), 8, "cpu")
    assert x.shape == (1, 8) and x.dtype == torch.long and dim == 1
    x, dim = example_input(nn.Sequential(nn.Linear(16, 4)), 8, "cpu")
    assert x.shape == (1, 8, 16) and dim == 1
    with pytest.raises(ValueError, match="no nn.Embedding or Linear"):
        example_input(nn.ReLU(), 8, "cpu")
    with pytest.raises(ValueError, match="reps"):
        compare(_gpt(), _gpt(), [4], reps=0)
    with pytest.raises(ValueError, match="token_counts"):
        compare(_gpt(), _gpt(), [0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_export_without_cuda_fails_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "bench-export", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "sparsetrain bench-export: needs a CUDA GPU (torch.cuda.is_available() is False)"


def test_bench_export_argument_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "bench-export", str(tmp_path), "--tokens", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tokens must be ints >= 1" in proc.stderr
