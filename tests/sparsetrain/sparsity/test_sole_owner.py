"""The private torch internals behind in-place gradient masking (sparsetrain/sparsity/_sole_owner.py).

If one of these fails after a torch upgrade, torch changed what the fast path relies on: the
sparsifier then still masks every gradient correctly (out of place, or in place where the counts
allow it), but the in-place path may be lost or, worse, taken for a shared gradient. Re-measure
and adapt ``_sole_owner.py`` before trusting it.
"""

import sys

import pytest
import torch
from torch import nn

from sparsetrain.sparsity import DynamicSparsifier
from sparsetrain.sparsity._sole_owner import ref_counts, sole_owner, sole_refs


def test_torch_still_has_the_private_counters():
    grad = torch.zeros(2, 2).t()  # a view, as a Linear weight's gradient is
    assert callable(getattr(grad, "_use_count", None)), "torch.Tensor._use_count is gone"
    assert callable(getattr(torch._C, "_storage_Use_Count", None)), "torch._C._storage_Use_Count is gone"
    counts = ref_counts(grad, sys.getrefcount(grad))
    assert all(isinstance(c, int) and c >= 1 for c in counts), counts


def test_unshared_gradients_were_measured_for_plain_and_view_gradients():
    plain, view = sole_refs()
    assert plain is not None, "no reference counts measured for a plain gradient: nothing is masked in place"
    assert view is not None, "no reference counts measured for a view gradient: Linear weights lose the fast path"
    assert sole_refs() is sole_refs()  # measured once per process


def _hook_verdicts(forward, keep=None):
    """What `sole_owner` says inside a weight hook (registered last, as the sparsifier's is)."""
    seen = []
    w = torch.randn(3, 3, requires_grad=True)
    if keep is not None:
        w.register_hook(keep.append)  # someone else keeps the gradient

    def hook(grad):
        seen.append(sole_owner(grad, sys.getrefcount(grad), sole_refs()))

    w.register_hook(hook)
    forward(w).sum().backward()
    return seen


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (lambda w: w * 2.0, True),  # a fresh, unshared gradient
        (lambda w: nn.functional.linear(torch.ones(4, 3), w), True),  # a view (transpose of a product)
        (lambda w: w + 0.0, False),  # an addition hands its output gradient to its input as is
    ],
)
def test_sole_owner_tells_unshared_from_shared_gradients(forward, expected):
    assert _hook_verdicts(forward) == [expected]


def test_a_gradient_kept_by_another_hook_is_shared():
    kept = []
    assert _hook_verdicts(lambda w: w * 2.0, keep=kept) == [False]
    assert len(kept) == 1


def test_a_double_backward_gradient_is_never_owned():
    w = torch.randn(3, 3, requires_grad=True)
    (g,) = torch.autograd.grad((w * w).sum(), [w], create_graph=True)
    assert g.requires_grad and not sole_owner(g, sys.getrefcount(g), sole_refs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_in_place_path_equals_the_public_torch_where_copy_bit_for_bit(dtype):
    # Twin layers: one's gradient is masked in place by the sparsifier's hook, the other's is the
    # plain torch.where copy of the same dense gradient.
    layer = nn.Linear(16, 12).to(dtype)
    incoming = {}
    layer.weight.register_hook(lambda g: incoming.setdefault("ptr", g.data_ptr()) and None)
    sp = DynamicSparsifier(layer, method="static", sparsity=0.6)
    mask = sp.masks()["weight"]
    ref = nn.Linear(16, 12).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0] = float("nan")  # NaN and inf in the gradient: masked to +0.0 outside the mask
    x[1, 1] = float("inf")
    layer(x).sum().backward()
    ref(x).sum().backward()
    assert layer.weight.grad.data_ptr() == incoming["ptr"]  # the in-place path was taken
    expected = torch.where(mask, ref.weight.grad, torch.zeros((), dtype=dtype))
    assert torch.equal(layer.weight.grad.view(torch.uint8), expected.view(torch.uint8))
