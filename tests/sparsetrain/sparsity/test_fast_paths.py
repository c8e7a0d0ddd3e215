"""The sparsifier's fast paths give what the straightforward code gives.

- Gradients are masked in place when the hook holds the only reference to them, else copied;
  both equal ``torch.where(mask, g, 0)`` bit for bit, and a gradient shared with anything else is
  never modified.
"""

import pytest
import torch
from torch import nn

from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _special(shape, dtype, seed=0):
    """NaN, +-inf, -0.0, +0.0 and ordinary values at random positions."""
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.5, -2.25], dtype=dtype)
    return values[torch.randint(0, len(values), shape, generator=torch.Generator().manual_seed(seed))]


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _record_pointer(seen, key):
    """A gradient hook that notes where the incoming gradient lives (and keeps no reference to it)."""
    def hook(g):
        seen.setdefault(key, g.data_ptr())
    return hook


class _Inject(torch.autograd.Function):
    """Identity forward; the backward hands the weight a given gradient: a fresh copy, or a tensor kept here."""

    kept: torch.Tensor | None = None

    @staticmethod
    def forward(ctx, w, grad, share):
        ctx.grad, ctx.share = grad, share
        return w.clone()

    @staticmethod
    def backward(ctx, _):
        if ctx.share:
            _Inject.kept = ctx.grad  # also referenced from here: the hook must not modify it
            return ctx.grad, None, None
        return ctx.grad.clone(), None, None


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_masking_equals_torch_where_bit_for_bit_in_place_or_not(dtype, share):
    layer = nn.Linear(12, 10).to(dtype)
    incoming = {}
    layer.weight.register_hook(_record_pointer(incoming, "ptr"))  # runs before the sparsifier's
    sp = DynamicSparsifier(layer, DynamicSparsityConfig(method="static", sparsity=0.6), total_steps=4)
    mask = sp.masks[""]
    grad = _special(layer.weight.shape, dtype)
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    _Inject.apply(layer.weight, grad.clone(), share).sum().backward()
    assert torch.equal(_bits(layer.weight.grad), _bits(expected))
    assert (layer.weight.grad.data_ptr() == incoming["ptr"]) is not share  # in place unless shared
    if share:
        assert torch.equal(_bits(_Inject.kept), _bits(grad))  # the shared tensor is untouched
        assert _Inject.kept.data_ptr() != layer.weight.grad.data_ptr()


def test_the_usual_linear_and_conv_gradients_are_masked_in_place():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    incoming = {}
    for name in ("0", "2"):  # registered first: sees the gradient the sparsifier's hook then receives
        model.get_submodule(name).weight.register_hook(_record_pointer(incoming, name))
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.7), total_steps=4)
    model(torch.randn(3, 2, 8, 8)).sum().backward()
    for name in ("0", "2"):
        w = model.get_submodule(name).weight
        assert w.grad.data_ptr() == incoming[name], name  # no new tensor
        assert not bool(w.grad[~sp.masks[name]].any())


def _two_layers():
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(6, 6, bias=False), "b": nn.Linear(6, 6, bias=False)})


# Ways a weight's gradient can be shared with another tensor's.
SHARING = {
    "added to a leaf": lambda m, x, leaf: (m["a"].weight + leaf).square().sum() + m["b"](x).sum(),
    "transposed and added to a leaf": lambda m, x, leaf: (m["a"].weight.t() + leaf).square().sum() + m["b"](x).sum(),
    "concatenated": lambda m, x, leaf: (torch.cat([m["a"].weight, m["b"].weight]) * leaf.repeat(2, 1)).sum(),
    "used twice": lambda m, x, leaf: (m["a"](x) * m["a"](x * 2)).sum() + (m["b"].weight * leaf).sum(),
    "stacked": lambda m, x, leaf: torch.stack([m["a"].weight, m["b"].weight, leaf]).cos().sum(),
}


@pytest.mark.parametrize("case", list(SHARING))
def test_a_shared_gradient_is_never_modified(case):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ref_model, model = _two_layers(), _two_layers()
    ref_leaf = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    leaf = ref_leaf.detach().clone().requires_grad_()
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.5), total_steps=4)
    with torch.no_grad():  # the same (masked) weights in both
        for name in ("a", "b"):
            ref_model[name].weight.copy_(model[name].weight)
    SHARING[case](ref_model, x, ref_leaf).backward()
    SHARING[case](model, x, leaf).backward()
    assert torch.equal(leaf.grad, ref_leaf.grad)
    for name in ("a", "b"):
        expected = torch.where(sp.masks[name], ref_model[name].weight.grad, 0)
        assert torch.equal(model[name].weight.grad, expected), name


def test_a_user_hook_that_keeps_the_gradient_keeps_it_unmasked():
    layer = nn.Linear(6, 6)
    kept = []
    layer.weight.register_hook(kept.append)  # before the sparsifier's hook
    sp = DynamicSparsifier(layer, DynamicSparsityConfig(method="static", sparsity=0.5), total_steps=4)
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    assert bool(kept[0][~sp.masks[""]].ne(0).any())  # still the dense gradient
    assert torch.equal(layer.weight.grad, torch.where(sp.masks[""], kept[0], 0))


def test_double_backward_gradients_are_masked_out_of_place():
    layer = nn.Linear(5, 5)
    sp = DynamicSparsifier(layer, DynamicSparsityConfig(method="static", sparsity=0.5), total_steps=4)
    (g,) = torch.autograd.grad(layer(torch.randn(2, 5)).square().sum(), [layer.weight], create_graph=True)
    assert torch.equal(g, torch.where(sp.masks[""], g, 0))
