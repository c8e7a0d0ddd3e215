"""The runtime on a GPU with cuSPARSELt (skipped elsewhere)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.demo.model import GPTConfig
from sparsetrain.runtime import (
    DispatchTable,
    Sparse24Linear,
    Timing,
    _cslt,
    capture,
    sparse_layers,
    sparsify_model,
)
from sparsetrain.runtime.bench import compare, format_report, layer_bytes
from sparsetrain.runtime.table import device_key

from .conftest import gpt_24, needs_cusparselt, random_24

pytestmark = needs_cusparselt

DTYPES = [torch.bfloat16, torch.float16]


def _close(a, b, what=""):
    scale = b.float().abs().max().item() or 1.0
    err = (a.float() - b.float()).abs().max().item()
    assert err <= 2e-2 * scale, f"{what}: max error {err} against max |y| {scale}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [8, 13, 512])
def test_cslt_linear_equals_the_public_semi_structured_path(dtype, bias, rows):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    w = random_24(128, 256, dtype=dtype, device="cuda")
    b = torch.randn(128, dtype=dtype, device="cuda") if bias else None
    x = torch.randn(rows, 256, dtype=dtype, device="cuda")
    public = F.linear(x, to_sparse_semi_structured(w), b)
    ours = _cslt.linear(_cslt.compress(w), x, b, alg_id=0)
    assert ours.shape == public.shape == (rows, 128)
    assert torch.equal(ours, public)
    _close(ours, F.linear(x, w, b), "against dense")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 256), (7, 256), (64, 256), (3, 5, 256), (2, 512, 256)])
def test_sparse24_linear_matches_dense(dtype, bias, shape):
    lin = nn.Linear(256, 128, bias=bias, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_24(128, 256, dtype=dtype, device="cuda"))
        mod = Sparse24Linear.from_linear(lin, backend="cusparselt")
        assert mod.weight is None
        x = torch.randn(shape, dtype=dtype, device="cuda")
        _close(mod(x), lin(x), f"{shape}")
        # a non-contiguous input and one at an odd storage offset
        xt = torch.randn(256, shape[0], dtype=dtype, device="cuda").t()
        _close(mod(xt), lin(xt), "transposed input")
        flat = torch.randn(shape[0] * 256 + 1, dtype=dtype, device="cuda")
        xo = flat[1:].view(shape[0], 256)
        _close(mod(xo), lin(xo), "odd offset")


def _table_for(shapes, timings):
    """This GPU's key, buckets (1, 256), the given timings for every shape (nothing to measure)."""
    table = DispatchTable(key=device_key(), buckets=(1, 256))
    for shape in shapes:
        for bucket, timing in zip((1, 256), timings):
            table.set(shape, torch.bfloat16, bucket, timing)
    return table


SLOW = Timing(dense_eager_ms=0.1, dense_graph_ms=0.1, sparse_eager_ms=0.9, sparse_graph_ms=0.2)
FAST = Timing(dense_eager_ms=0.5, dense_graph_ms=0.5, sparse_eager_ms=0.4, sparse_graph_ms=0.3)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.copy_(random_24(512, 256, device="cuda", seed=1))
        model[2].weight.copy_(random_24(256, 512, device="cuda", seed=2))
    return model.eval()


def test_dispatch_table_picks_dense_where_sparse_loses(monkeypatch):
    calls = []
    real = _cslt.linear
    monkeypatch.setattr(_cslt, "linear", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    shapes = [(512, 256), (256, 512)]
    # sparse loses everywhere: the layers become dense modules
    model = sparsify_model(_mlp(), table=_table_for(shapes, [SLOW, SLOW]))
    assert sparse_layers(model) == {"0": "dense", "2": "dense"}
    # sparse loses at 1 token, wins from 256: 2:4 with a dense copy; calls follow the bucket
    ref = _mlp()
    model = sparsify_model(_mlp(), table=_table_for(shapes, [SLOW, FAST]))
    assert sparse_layers(model) == {"0": "2:4 + dense", "2": "2:4 + dense"}
    with torch.no_grad():
        # twice over: the second round takes each decision from the layer's per-row-count cache
        for tokens, sparse in ((1, False), (100, False), (256, True), (300, True)) * 2:
            calls.clear()
            x = torch.randn(tokens, 256, device="cuda", dtype=torch.bfloat16)
            _close(model(x), ref(x), f"{tokens} tokens")
            assert len(calls) == (2 if sparse else 0), tokens
    # with min_tokens=256 no call runs dense: no dense copy kept
    model = sparsify_model(_mlp(), table=_table_for(shapes, [SLOW, FAST]), min_tokens=256)
    assert sparse_layers(model) == {"0": "2:4", "2": "2:4"}


def test_model_with_ineligible_layers():
    from .test_sparsify import Net

    model = Net().cuda().to(torch.bfloat16).eval()
    ref = Net().cuda().to(torch.bfloat16).eval()
    ref.load_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify_model(model, backend="cusparselt")
    messages = [str(w.message) for w in caught if "sparsify_model" in str(w.message)]
    assert len(messages) == 1 and "3 Linear layer(s) stay dense" in messages[0]
    assert sparse_layers(model) == {"fc1": "2:4", "fc2": "2:4"}
    x = torch.randn(2, 32, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _close(model(x), ref(x), "model")


def test_layer_memory_is_at_most_0_6_of_dense():
    dense = _mlp()
    ours = sparsify_model(_mlp(), backend="cusparselt")
    assert layer_bytes(ours, ["0", "2"]) <= 0.6 * layer_bytes(dense, ["0", "2"])


def _gpt():
    return gpt_24(GPTConfig(d_model=128, n_layer=2, n_head=2, block_size=256), seed_by_name=True).cuda()


@pytest.mark.parametrize("which", ["mlp", "gpt"])
def test_captured_model_matches_eager(which):
    dense = _mlp() if which == "mlp" else _gpt()
    model = sparsify_model(_mlp() if which == "mlp" else _gpt(), backend="cusparselt", ignore=("*attn*", "lm_head"))
    if which == "mlp":
        def make(t):
            return torch.randn(t, 256, device="cuda", dtype=torch.bfloat16)
        token_dim, counts, above = 0, (16, 64), 100
    else:
        def make(t):
            return torch.randint(0, 256, (2, t), device="cuda")
        token_dim, counts, above = 1, (16, 64), 200
    fast = capture(model, make(16), token_counts=counts, token_dim=token_dim)
    with torch.no_grad():
        for t in (16, 10, 64, 40, above):
            x = make(t)
            out = fast(x)
            assert out.shape == model(x).shape
            _close(out, model(x), f"captured vs eager at {t}")
            _close(out, dense(x), f"captured vs dense at {t}")
    with pytest.raises(ValueError, match="must match the captured"):
        fast(make(16)[None])


def test_measured_table_is_cached_and_reloaded():
    table = DispatchTable.cached(buckets=(16, 512))
    assert table.measure([((256, 256), torch.bfloat16)], reps=2) == 2
    for tokens in (16, 512):
        t = table.get((256, 256), torch.bfloat16, tokens)
        assert t is not None and t.dense_graph_ms > 0 and (t.sparse_graph_ms is None or t.sparse_graph_ms > 0)
    again = DispatchTable.cached(buckets=(16, 512))
    assert again.to_dict() == table.to_dict()
    assert again.measure([((256, 256), torch.bfloat16)]) == 0


def test_bench_compare_on_the_gpu():
    dense = sparsify_model(_gpt(), backend="dense", ignore=("*attn*", "lm_head"))
    ours = sparsify_model(_gpt(), backend="cusparselt", ignore=("*attn*", "lm_head"))
    result = compare(dense, ours, [16, 64], reps=2)
    assert [r["tokens"] for r in result["rows"]] == [16, 64]
    assert all(r["ours_graph_ms"] > 0 and r["max_abs_diff"] <= 2e-2 * r["max_abs_ref"] for r in result["rows"])
    assert result["ours_bytes"] <= 0.6 * result["dense_bytes"]
    assert "2:4 graph" in format_report(result)
