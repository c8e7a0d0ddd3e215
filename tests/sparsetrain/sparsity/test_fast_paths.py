"""The sparsifier's fast paths give what the straightforward code gives.

- Gradients are masked in place when the hook holds the only reference to them, else copied;
  both equal ``torch.where(mask, g, 0)`` bit for bit, and a gradient shared with anything else is
  never modified.
- Mask updates select the layers of one shape and count together; the masks equal the per-layer
  pure functions (``rigl_update``, ``set_update``, ``magnitude_prune``).
"""

import math

import pytest
import torch
from torch import nn

from sparsetrain.sparsity import (
    DynamicSparsifier,
    DynamicSparsityConfig,
    magnitude_prune,
    rigl_update,
    set_update,
    update,
)
from sparsetrain.sparsity.gmp import _prune_rows
from sparsetrain.sparsity.rigl import _rigl_rows
from sparsetrain.sparsity.set import _draw_growth_scores, _set_rows

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
def _layer_masks(sp):
    """Module name -> mask (``masks()`` is keyed by parameter name)."""
    return {name.rpartition(".")[0]: mask for name, mask in sp.masks().items()}


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
    mask = _layer_masks(sp)[""]
    grad = _special(layer.weight.shape, dtype)
    expected = torch.where(mask, grad, torch.zeros((), dtype=dtype))
    _Inject.apply(layer.weight, grad.clone(), share).sum().backward()
    assert torch.equal(_bits(layer.weight.grad), _bits(expected))
    assert (layer.weight.grad.data_ptr() == incoming["ptr"]) is not share  # in place unless shared
    if share:
        assert torch.equal(_bits(_Inject.kept), _bits(grad))  # the shared tensor is untouched
        assert _Inject.kept.data_ptr() != layer.weight.grad.data_ptr()


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_the_usual_linear_and_conv_gradients_are_masked_in_place(device):
    # On CUDA the hook runs on the autograd engine's device thread: the reference counts measured
    # on the CPU must hold there too, or every gradient would be copied.
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(device)
    incoming = {}
    for name in ("0", "2"):  # registered first: sees the gradient the sparsifier's hook then receives
        model.get_submodule(name).weight.register_hook(_record_pointer(incoming, name))
    sp = DynamicSparsifier(model, DynamicSparsityConfig(method="static", sparsity=0.7), total_steps=4)
    model(torch.randn(3, 2, 8, 8, device=device)).sum().backward()
    for name in ("0", "2"):
        w = model.get_submodule(name).weight
        assert w.grad.data_ptr() == incoming[name], name  # no new tensor
        assert not bool(w.grad[~_layer_masks(sp)[name]].any())


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
        expected = torch.where(_layer_masks(sp)[name], ref_model[name].weight.grad, 0)
        assert torch.equal(model[name].weight.grad, expected), name


def test_a_user_hook_that_keeps_the_gradient_keeps_it_unmasked():
    layer = nn.Linear(6, 6)
    kept = []
    layer.weight.register_hook(kept.append)  # before the sparsifier's hook
    sp = DynamicSparsifier(layer, DynamicSparsityConfig(method="static", sparsity=0.5), total_steps=4)
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    assert bool(kept[0][~_layer_masks(sp)[""]].ne(0).any())  # still the dense gradient
    assert torch.equal(layer.weight.grad, torch.where(_layer_masks(sp)[""], kept[0], 0))


def test_double_backward_gradients_are_masked_out_of_place():
    layer = nn.Linear(5, 5)
    sp = DynamicSparsifier(layer, DynamicSparsityConfig(method="static", sparsity=0.5), total_steps=4)
    (g,) = torch.autograd.grad(layer(torch.randn(2, 5)).square().sum(), [layer.weight], create_graph=True)
    assert torch.equal(g, torch.where(_layer_masks(sp)[""], g, 0))


# ------------------------------------------------------------------ grouped updates


class _Tower(nn.Module):
    """Layers of repeated shapes (grouped by the update) around one of its own shape."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(24, 24) for _ in range(4))
        self.wide = nn.ModuleList(nn.Linear(24, 40) for _ in range(2))
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(sum(torch.relu(w(x)) for w in self.wide))


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_grouped_updates_equal_the_layer_by_layer_pure_functions(method, grouped, monkeypatch):
    monkeypatch.setattr(DynamicSparsifier, "_group_on_cpu", grouped)  # as on an accelerator, or not
    torch.manual_seed(0)
    model = _Tower()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put: the reference sees the same
    cfg = DynamicSparsityConfig(method=method, sparsity=0.7, update_every=1, drop_fraction=0.4,
                                drop_schedule="constant", end_fraction=1.0, seed=3)
    sp = DynamicSparsifier(model, cfg, total_steps=4, optimizer=opt)
    largest = max(len(g) for g in sp._groups(dict.fromkeys(sp.layer_names, 1)).values())
    assert largest > 1 if grouped else largest == 1  # (ERK's rounding may leave one block apart)
    with torch.no_grad():  # ties in |W| across and within layers
        for name in sp.layer_names:
            w = model.get_submodule(name).weight
            w.copy_(torch.where(_layer_masks(sp)[name], w.mul(8).round().div(8), 0))
    old = {n: m.clone() for n, m in _layer_masks(sp).items()}
    generator = torch.Generator()
    generator.set_state(sp._generator.get_state())
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    model(x).square().mean().backward()
    dense = {n: g.clone() for n, g in sp._dense_grads.items()}
    opt.step()
    assert sp.statistics()["sparsity/updates"] == 1
    keep = sp.statistics()["sparsity/active"]
    for name in sp.layer_names:
        w, n_active = model.get_submodule(name).weight, int(old[name].sum())
        if method == "rigl":
            expected = rigl_update(w, dense[name], old[name], math.floor(0.4 * n_active))
        elif method == "set":
            expected = set_update(w, old[name], math.floor(0.4 * n_active), generator)  # draws in layer order
        else:
            expected = magnitude_prune(w, old[name], int(_layer_masks(sp)[name].sum()))
        assert torch.equal(_layer_masks(sp)[name], expected), name
    assert keep == sum(int(m.sum()) for m in _layer_masks(sp).values())
    if method == "set":
        assert torch.equal(generator.get_state(), sp._generator.get_state())


@pytest.mark.parametrize("seed", range(3))
def test_row_updates_equal_one_layer_at_a_time(seed):
    g = torch.Generator().manual_seed(seed)
    rows, n, n_active = 5, 60, 24
    weight_LN = torch.randint(-3, 4, (rows, n), generator=g).float()  # ties
    grad_LN = torch.randint(-2, 3, (rows, n), generator=g).float()
    mask_LN = torch.zeros(rows, n, dtype=torch.bool)
    for r in range(rows):  # the same active count in every row
        mask_LN[r, torch.randperm(n, generator=g)[:n_active]] = True
    scores_LN = torch.rand(rows, n, generator=g)
    for k in (0, 1, 7, 13, n_active):
        rigl = _rigl_rows(weight_LN, grad_LN, mask_LN, k, n_active)
        set_ = _set_rows(weight_LN, mask_LN, scores_LN if k else None, k, n_active)
        prune = _prune_rows(weight_LN, mask_LN, k, n_active)
        for r in range(rows):
            assert torch.equal(rigl[r], rigl_update(weight_LN[r], grad_LN[r], mask_LN[r], k)), (k, r)
            assert torch.equal(prune[r], magnitude_prune(weight_LN[r], mask_LN[r], k)), (k, r)
            if k:
                assert torch.equal(set_[r], _set_rows(weight_LN[r:r + 1], mask_LN[r:r + 1], scores_LN[r:r + 1],
                                                      k, n_active)[0]), (k, r)


def test_growth_scores_filled_row_by_row_are_one_draw_per_row():
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = torch.empty(3, 10)
    for r in range(3):
        _draw_growth_scores(out[r], a)
    assert torch.equal(out, torch.stack([torch.rand(10, generator=b) for _ in range(3)]))


def _set_run(steps, device, state=None):
    """SET on ``_Tower``; with ``state`` (model, optimizer, sparsifier state dicts) resumed from it."""
    torch.manual_seed(0)
    model = _Tower().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = DynamicSparsityConfig(method="set", sparsity=0.8, update_every=2, end_fraction=1.0, seed=9)
    sp = DynamicSparsifier(model, cfg, total_steps=8, optimizer=opt)
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        sp.load_state_dict(state[2])
    for step in range(sp.step_count, steps):
        x = torch.randn(8, 24, generator=torch.Generator().manual_seed(step)).to(device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, sp


def _check_set_device_draws(device):
    ref = _set_run(8, device)[2]
    again = _set_run(8, device)[2]
    assert all(torch.equal(_layer_masks(ref)[n], _layer_masks(again)[n]) for n in ref.layer_names)
    model, opt, sp = _set_run(3, device)
    state = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), sp.state_dict())
    resumed = _set_run(8, device, state)[2]
    assert all(torch.equal(_layer_masks(ref)[n], _layer_masks(resumed)[n]) for n in ref.layer_names)
    assert ref.statistics() == resumed.statistics()
    return ref


def test_set_scores_drawn_by_a_device_generator_repeat_and_resume_exactly(monkeypatch):
    # Stand-in for an accelerator: a second CPU generator takes the device generator's place, which
    # runs the reseeding path on this machine.
    monkeypatch.setattr(update, "_device_generator",
                        lambda device, generators: generators.setdefault(device, torch.Generator()))
    monkeypatch.setattr(DynamicSparsifier, "_group_on_cpu", True)
    ref = _check_set_device_draws("cpu")
    assert ref._device_generators and ref.statistics()["sparsity/regrown_total"] > 0
    monkeypatch.undo()
    plain = _set_run(8, "cpu")[2]  # without the stand-in: the CPU generator draws the scores itself
    assert not plain._device_generators
    assert any(not torch.equal(_layer_masks(ref)[n], _layer_masks(plain)[n]) for n in ref.layer_names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_set_on_cuda_draws_on_the_device_alike_for_one_seed_and_resumes_exactly():
    ref = _check_set_device_draws("cuda")
    assert ref._device_generators  # the scores were drawn on the GPU
