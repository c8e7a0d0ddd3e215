"""Bad input and loaded state the dynamic sparsifier refuses, and what it says about unreachable targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetrain.sparsity import DynamicSparsifier
from sparsetrain.sparsity.density import floor_count, layer_active_counts


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _sparsifier(model: nn.Module | None = None, **kw) -> DynamicSparsifier:
    kw = {"method": "rigl", "sparsity": 0.5, "update_every": 2, "total_steps": 10, **kw}
    return DynamicSparsifier(model if model is not None else _model(), **kw)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("make", "match"), [
    (lambda m: m.update({"0.weight_mask": torch.zeros(32, 16, dtype=torch.bool)}), "keeps no weight"),
    (lambda m: m.update({"0.weight_mask": m["0.weight_mask"].float()}), "must be a bool tensor"),
    (lambda m: m.update({"0.weight_mask": torch.ones(16, 32, dtype=torch.bool)}), "has shape"),
    (lambda m: m.update({"0.weight_mask": torch.ones(32, 16, dtype=torch.bool)}), "keeps 512 of 512"),
])
def test_a_model_state_with_a_bad_mask_is_refused_before_anything_loads(make, match):
    model = _model()
    _sparsifier(model)
    state = _snapshot(model)
    for k in state:
        if not k.endswith("mask"):
            state[k] = state[k] + 1.0  # would change the weights if anything loaded
    make(state)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state)
    assert _same(before, _snapshot(model))


def test_a_good_model_state_still_loads():
    model = _model()
    sp = _sparsifier(model)
    state = _snapshot(model)
    other = _model()
    _sparsifier(other, seed=3)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(sp.masks().values(), other.state_dict().values()) if a.dtype == b.dtype
               and a.shape == b.shape)
    assert torch.equal(other.state_dict()["0.weight_mask"], state["0.weight_mask"])


def test_gmp_accepts_denser_masks_but_not_denser_than_dense_or_sparser_than_its_final_count():
    model = _model()
    sp = DynamicSparsifier(model, method="gmp", sparsity=0.5, update_every=2, total_steps=10)
    state = _snapshot(model)
    model.load_state_dict(state)  # dense at the start: fine
    final = layer_active_counts({"0": (32, 16), "2": (8, 32)}, 0.5, "erk")["0"]
    few = torch.zeros(32 * 16, dtype=torch.bool)
    few[: final - 1] = True
    state["0.weight_mask"] = few.view(32, 16)
    with pytest.raises(ValueError, match="fewer than the"):
        model.load_state_dict(state)
    assert sp.statistics()["sparsity/global"] == 0.0


def _state(sp: DynamicSparsifier) -> dict:
    return sp.state_dict()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s.pop("step"), "truncated: it has no 'step'"),
    (lambda s: s.pop("method"), "truncated: it has no 'method'"),
    (lambda s: s.pop("rng_state"), "truncated: it has no 'rng_state'"),
    (lambda s: s.update(step=-1), r"`state\['step'\]` must be an int >= 0"),
    (lambda s: s.update(step="3"), r"`state\['step'\]` must be an int >= 0"),
    (lambda s: s.update(rng_state=torch.zeros(3)), r"`state\['rng_state'\]` must be a uint8 tensor"),
    (lambda s: s["ever_active"].update({"0": s["ever_active"]["0"].float()}), r"ever_active'\]\['0'\]"),
    (lambda s: s["ever_active"].pop("2"), r"`state\['ever_active'\]` must map every"),
    (lambda s: s.update(schedule={"method": "rigl"}), r"`state\['schedule'\]` is not a valid schedule"),
    (lambda s: s.update(layers="0"), "covers layers"),
])
def test_a_truncated_or_malformed_sparsifier_state_is_refused_and_changes_nothing(edit, match):
    sp = _sparsifier()
    state = _state(sp)
    edit(state)
    before, stats = _snapshot(sp.model), sp.statistics()
    with pytest.raises(ValueError, match=match):
        sp.load_state_dict(state)
    assert _same(before, _snapshot(sp.model)) and sp.statistics() == stats


def test_the_sparsifier_load_refuses_masks_the_model_holds_that_it_could_not():
    sp = _sparsifier()
    state = _state(sp)
    with torch.no_grad():
        sp.model[0].weight_mask.fill_(False)  # written behind the sparsifier's back
    with pytest.raises(ValueError, match="keeps no weight"):
        sp.load_state_dict(state)


@pytest.mark.parametrize(("kw", "error", "match"), [
    ({"drop_fraction": "0.3"}, TypeError, "`drop_fraction` must be a finite number, got '0.3'"),
    ({"drop_fraction": float("nan")}, TypeError, "`drop_fraction` must be a finite number"),
    ({"end_fraction": "1"}, TypeError, "`end_fraction` must be a finite number"),
    ({"total_steps": float("nan")}, ValueError, "`total_steps` must be an int >= 1, got nan"),
    ({"total_steps": 0}, ValueError, "`total_steps` must be an int >= 1"),
    ({"keep_first_dense": "no"}, TypeError, "`keep_first_dense` must be a bool"),
    ({"seed": True}, ValueError, "`seed` must be an int"),
])
def test_bad_arguments_are_named(kw, error, match):
    model = _model()
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        _sparsifier(model, **kw)
    assert _same(before, _snapshot(model))


def test_a_string_as_the_model_is_a_type_error():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got str"):
        DynamicSparsifier("model", sparsity=0.5)


def test_layers_too_small_for_the_target_are_named_and_statistics_report_the_achieved_value():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.warns(UserWarning, match=r"sparsity=0.99 cannot be reached.*0 \(0.75\), 1 \(0.75\)"):
        sp = DynamicSparsifier(model, method="static", sparsity=0.99, total_steps=10)
    stats = sp.statistics()
    assert stats["sparsity/global"] == pytest.approx(0.75)
    assert stats["sparsity/layer/0"] == pytest.approx(0.75)
    assert stats["sparsity/target"] == pytest.approx(0.99)


def test_a_reachable_target_does_not_warn(recwarn):
    _sparsifier(sparsity=0.9)
    assert not [w for w in recwarn if "cannot be reached" in str(w.message)]


@pytest.mark.parametrize(("fraction", "active"), [(0.29, 100), (0.7, 10), (0.1, 30), (0.3, 7), (0.57, 100)])
def test_one_rounding_rule_for_counts(fraction, active):
    exact = round(fraction * active * 1000) / 1000  # the product as meant, in decimal
    assert floor_count(fraction * active) == math.floor(exact + 1e-12)


@pytest.mark.parametrize("method", ["gmp", "rigl", "set"])
def test_nan_weights_at_a_mask_update_are_refused_naming_the_layer(method):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method=method, sparsity=0.5, update_every=1, total_steps=10, optimizer=opt)
    model(torch.randn(4, 16)).sum().backward()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layer\(s\) 2 hold NaN or inf"):
        opt.step()
    assert sp.update_count == 0
