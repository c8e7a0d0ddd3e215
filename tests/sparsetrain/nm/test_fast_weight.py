"""The direct ``weight`` property relies on torch.nn.utils.parametrize internals: these tests fail
loudly when torch changes them, and hold the fast path to the public one."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsetrain.nm import NMConfig, NMMask, NMSparsifier, _fast_weight, nm_mask


def _layer(seed=0, fast=True, lambda_w=0.0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 4)
    p = NMMask(nm_mask(layer.weight, 2, 4), lambda_w=lambda_w)
    parametrize.register_parametrization(layer, "weight", p, unsafe=True)
    if fast:
        assert _fast_weight.install(layer)
    return layer


def test_torch_internals_are_as_relied_on():
    # If one of these fails, torch changed parametrize: update _fast_weight (or drop it).
    assert isinstance(parametrize._cache_enabled, int)
    layer = _layer(fast=False)
    assert isinstance(type(layer).__dict__["weight"], property)
    plist = layer._modules["parametrizations"]._modules["weight"]
    assert isinstance(plist, parametrize.ParametrizationList)
    assert plist._parameters["original"] is layer.parametrizations.weight.original
    assert plist._modules["0"] is layer.parametrizations.weight[0]
    assert _fast_weight.supported(layer)
    assert _fast_weight.dense_weight(layer) is layer.parametrizations.weight.original
    with parametrize.cached():
        assert parametrize._cache_enabled


def test_fast_path_equals_the_public_path():
    fast, plain = _layer(fast=True, lambda_w=0.1), _layer(fast=False, lambda_w=0.1)
    assert _fast_weight.installed(fast) and not _fast_weight.installed(plain)
    assert torch.equal(fast.weight, plain.weight)
    x = torch.randn(3, 8)
    for layer in (fast, plain):
        layer(x).square().sum().backward()
    assert torch.equal(fast.parametrizations.weight.original.grad, plain.parametrizations.weight.original.grad)
    # Inside parametrize.cached() both defer to parametrize's cache: one tensor per access.
    with parametrize.cached():
        assert fast.weight is fast.weight and torch.equal(fast.weight, plain.weight)
    assert fast.weight is not fast.weight
    # Assigning goes through parametrize's own setter.
    prop = type(fast).__dict__["weight"]
    assert prop.fset is prop.fget.__sparsetrain_original__.fset
    for layer in (fast, plain):
        with pytest.raises(RuntimeError, match="does not implement right_inverse"):
            layer.weight = torch.randn(4, 8)


def test_uninstall_and_removal_restore_the_plain_class():
    layer = _layer()
    _fast_weight.uninstall(layer)
    assert not _fast_weight.installed(layer) and torch.equal(layer.weight, _layer(fast=False).weight)
    layer = _layer()
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    assert type(layer) is nn.Linear and isinstance(layer.weight, nn.Parameter)


def test_unsupported_layout_keeps_the_public_property():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    parametrize.register_parametrization(layer, "weight", nn.Identity())  # two: not the fast path's case
    _fast_weight._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="parametrize internals changed"):
        assert not _fast_weight.install(layer)
    assert not _fast_weight.installed(layer)


def test_the_sparsifier_uses_the_fast_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    sp = NMSparsifier(model, NMConfig())
    assert all(_fast_weight.installed(mod) for mod in sp.layers.values())
    sp.remove()
    assert all(type(mod) is nn.Linear for mod in sp.layers.values())
