import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.runtime import LayerPlan, Sparse24Linear
from sparsetrain.runtime import linear as linear_mod
from sparsetrain.runtime.linear import graph_decisions

from .conftest import random_24


def _layer(out_f=32, in_f=64, bias=True, dtype=torch.bfloat16, seed=0):
    layer = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(random_24(out_f, in_f, dtype=dtype, seed=seed))
    return layer


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (2, 1, 4, 64), (0, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_backend_equals_the_linear(shape, bias, dtype):
    lin = _layer(bias=bias, dtype=dtype)
    mod = Sparse24Linear.from_linear(lin, backend="dense")
    x = torch.randn(shape, dtype=dtype)
    assert mod.packed is None and mod.weight is not None
    assert not mod.uses_sparse(4096, graph=True)
    with torch.no_grad():
        assert torch.equal(mod(x), lin(x))


class _StandIn:
    """A CPU stand-in for the cuSPARSELt calls (``_cslt``): records which path each call took."""

    def __init__(self):
        self.sparse_calls, self.searches = [], []

    def compress(self, w):
        return w.detach().clone().view(w.shape[0], -1)

    def linear(self, packed, x, bias, alg_id=0, out_dtype=None):
        self.sparse_calls.append((x.shape[0], alg_id))
        return F.linear(x, packed, bias)

    def search(self, packed, x, bias):
        self.searches.append(x.shape[0])
        return 40 + len(self.searches)


@pytest.fixture
def standin(monkeypatch):
    """cuSPARSELt replaced by the stand-in, CPU tensors accepted: the module's dispatch logic on the CPU."""
    s = _StandIn()
    for name in ("compress", "linear", "search"):
        monkeypatch.setattr(linear_mod._cslt, name, getattr(s, name))
    monkeypatch.setattr(linear_mod._cslt, "supports", lambda device: True)
    return s


PLAN = LayerPlan(buckets=(1, 16, 512), sparse_eager=(False, False, True), sparse_graph=(False, True, True),
                 alg_ids=(None, None, 7))


@pytest.mark.parametrize("tokens, graph, sparse", [
    (1, False, False), (15, False, False), (16, False, False), (600, False, True),
    (1, True, False), (15, True, False), (16, True, True), (511, True, True), (512, True, True),
])
def test_dispatch_follows_the_plan_by_token_count_and_mode(standin, tokens, graph, sparse):
    lin = _layer()
    mod = Sparse24Linear.from_linear(lin, plan=PLAN)
    assert mod.weight is not None  # the plan runs dense somewhere: the dense copy is kept
    assert mod.uses_sparse(tokens, graph=graph) == sparse
    x = torch.randn(tokens, 64, dtype=torch.bfloat16)
    with torch.no_grad(), (graph_decisions() if graph else torch.no_grad()):
        y = mod(x)
        assert torch.equal(y, lin(x))
    assert len(standin.sparse_calls) == int(sparse)


def test_algorithm_searched_once_per_bucket_and_table_ids_used(standin):
    mod = Sparse24Linear.from_linear(_layer(), plan=PLAN)
    with torch.no_grad(), graph_decisions():
        for tokens in (16, 20, 100, 16, 512, 600):
            mod(torch.randn(tokens, 64, dtype=torch.bfloat16))
    assert standin.searches == [16]  # bucket 16 searched at its first call; bucket 512 had id 7
    assert standin.sparse_calls == [(16, 41), (20, 41), (100, 41), (16, 41), (512, 7), (600, 7)]


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)])
def test_sparse_path_shapes_and_bias(standin, shape):
    lin = _layer(bias=True)
    mod = Sparse24Linear.from_linear(lin)  # no plan: 2:4 for every call, no dense copy
    assert mod.weight is None
    x = torch.randn(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        y = mod(x)
        assert y.shape == (*shape[:-1], 32)
        assert torch.equal(y, lin(x))
        assert mod(torch.randn(0, 64, dtype=torch.bfloat16)).shape == (0, 32)
    assert [r for r, _ in standin.sparse_calls] == [shape[0] if len(shape) == 2 else shape[0] * shape[1]]


def test_keep_dense_follows_the_plan_or_the_argument(standin):
    lin = _layer()
    everywhere = LayerPlan(buckets=(1, 16), sparse_eager=(True, True), sparse_graph=(True, True), alg_ids=(1, 2))
    assert Sparse24Linear.from_linear(lin, plan=everywhere).weight is None
    assert Sparse24Linear.from_linear(lin, plan=everywhere, keep_dense=True).weight is not None
    mod = Sparse24Linear.from_linear(lin, plan=PLAN, keep_dense=False)
    assert mod.weight is None and mod.uses_sparse(1)  # without a dense copy every call runs 2:4


def test_packed_weight_is_not_in_the_state_dict(standin):
    mod = Sparse24Linear.from_linear(_layer(), plan=PLAN)
    assert set(mod.state_dict()) == {"weight", "bias"}
    assert "packed" not in Sparse24Linear.from_linear(_layer()).state_dict()


def test_construction_validation():
    lin = _layer()
    with pytest.raises(ValueError, match="not 2:4: row 0, columns 0..3"):
        Sparse24Linear(torch.ones(32, 64, dtype=torch.bfloat16), backend="dense")
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        Sparse24Linear(lin.weight.float(), backend="dense")
    with pytest.raises(ValueError, match="multiples of 16"):
        Sparse24Linear(torch.zeros(32, 40, dtype=torch.bfloat16), backend="dense")
    with pytest.raises(TypeError, match="2-D"):
        Sparse24Linear(torch.zeros(64, dtype=torch.bfloat16), backend="dense")
    with pytest.raises(ValueError, match="bias"):
        Sparse24Linear(lin.weight, torch.zeros(31, dtype=torch.bfloat16), backend="dense")
    with pytest.raises(TypeError, match="bias"):
        Sparse24Linear(lin.weight, torch.zeros(32), backend="dense")
    with pytest.raises(ValueError, match="backend"):
        Sparse24Linear(lin.weight, backend="cutlass")
    with pytest.raises(TypeError, match="plan"):
        Sparse24Linear(lin.weight, backend="dense", plan={"16": True})
    with pytest.raises(TypeError, match="linear"):
        Sparse24Linear.from_linear(nn.Conv1d(4, 4, 1))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the weight on CUDA"):
            Sparse24Linear.from_linear(lin)


def test_forward_validation(standin):
    mod = Sparse24Linear.from_linear(_layer())
    with pytest.raises(ValueError, match="in_features=64"):
        mod(torch.randn(3, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        mod(torch.randn(3, 64))


def test_packed_weight_never_changes_dtype_or_device(standin):
    mod = Sparse24Linear.from_linear(_layer(), plan=PLAN)
    mod.to(torch.bfloat16)  # no change: fine
    with pytest.raises(RuntimeError, match="cannot change dtype or device"):
        mod.half()
    with pytest.raises(RuntimeError, match="cannot change dtype or device"):
        nn.Sequential(mod).to(torch.float32)
    assert mod.packed.dtype == mod.weight.dtype == torch.bfloat16  # nothing moved
    dense = Sparse24Linear.from_linear(_layer(), backend="dense").half()
    assert dense.weight.dtype == torch.float16
