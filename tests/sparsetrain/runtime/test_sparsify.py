import warnings

import pytest
import torch
from torch import nn

from sparsetrain.runtime import DispatchTable, Sparse24Linear, _cslt, sparse_layers, sparsify_model

from .conftest import random_24


class Net(nn.Module):
    """Two 2:4 layers, one not 2:4, one with an odd width, one fp32 layer, one inside attention."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64, bias=False)
        self.dense = nn.Linear(64, 64)
        self.odd = nn.Linear(64, 40)
        self.attn = nn.MultiheadAttention(64, 2, batch_first=True)
        with torch.no_grad():
            self.fc1.weight.copy_(random_24(128, 64, dtype=torch.float32, seed=1))
            self.fc2.weight.copy_(random_24(64, 128, dtype=torch.float32, seed=2))
            self.odd.weight.copy_(random_24(40, 64, dtype=torch.float32, seed=3))

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.odd(self.dense(h))


def _net(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return Net().to(dtype)


def _sparsify_one_warning(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sparsify_model(model, **kwargs)
    ours = [w for w in caught if "sparsify_model" in str(w.message)]
    assert len(ours) <= 1
    return out, (str(ours[0].message) if ours else "")


@pytest.mark.parametrize("backend", ["dense", "auto"])
def test_swaps_exactly_the_eligible_layers_with_one_warning(backend):
    if backend == "auto" and _cslt.available():
        pytest.skip("auto runs cuSPARSELt here; covered by the GPU tests")
    model = _net()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    out, message = _sparsify_one_warning(model, backend=backend)
    assert out is model
    assert sparse_layers(model) == {"fc1": "dense", "fc2": "dense"}
    assert isinstance(model.fc1, Sparse24Linear) and isinstance(model.dense, nn.Linear)
    assert type(model.attn.out_proj) is not Sparse24Linear
    assert "3 Linear layer(s) stay dense" in message
    assert "dense (not 2:4 (row" in message and "odd (shape 40x64" in message
    assert "attn.out_proj (NonDynamicallyQuantizableLinear" in message
    assert ("cuSPARSELt is not available" in message) == (backend == "auto")
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_ignore_silences_and_skips():
    model = _net()
    _, message = _sparsify_one_warning(model, backend="dense", ignore=("dense", "odd", "attn.*", "fc2"))
    assert message == ""
    assert sparse_layers(model) == {"fc1": "dense"}


def test_fp32_model_stays_dense_with_the_reason():
    model = _net(torch.float32)
    _, message = _sparsify_one_warning(model, backend="dense")
    assert sparse_layers(model) == {}
    assert "fc1 (dtype float32 (2:4 needs bfloat16 or float16))" in message


def test_already_sparsified_layers_are_left_alone():
    model = _net()
    sparsify_model(model, backend="dense", ignore=("dense", "odd", "attn.*"))
    first = model.fc1
    sparsify_model(model, backend="dense", ignore=("dense", "odd", "attn.*"))
    assert model.fc1 is first


def test_a_bare_linear_is_returned_swapped():
    layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(random_24(32, 64))
    out = sparsify_model(layer, backend="dense")
    assert isinstance(out, Sparse24Linear)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"backend": "cutlass"}, ValueError, "backend"),
    ({"backend": "dense", "table": DispatchTable()}, ValueError, "table"),
    ({"table": {"a": 1}}, TypeError, "table"),
    ({"ignore": "fc1"}, ValueError, "ignore"),
    ({"ignore": [1]}, ValueError, "ignore"),
    ({"min_tokens": 0}, ValueError, "min_tokens"),
    ({"min_tokens": 1.5}, ValueError, "min_tokens"),
    ({"min_tokens": True}, ValueError, "min_tokens"),
])
def test_argument_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        sparsify_model(_net(), **kwargs)


def test_model_validation_and_cusparselt_without_cuda():
    with pytest.raises(TypeError, match="model"):
        sparsify_model({"fc": 1})
    with pytest.raises(TypeError, match="model"):
        sparse_layers([1])
    if not _cslt.available():
        with pytest.raises(ValueError, match="backend='cusparselt' needs CUDA with cuSPARSELt"):
            sparsify_model(_net(), backend="cusparselt")


def test_a_shared_linear_is_swapped_under_every_name():
    shared = nn.Linear(64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        shared.weight.copy_(random_24(64, 64))
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x)
    sparsify_model(model, backend="dense")
    assert isinstance(model[0], Sparse24Linear) and model[0] is model[2]
    with torch.no_grad():
        assert torch.equal(model(x), ref)
