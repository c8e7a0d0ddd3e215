"""Bad input and loaded state that DGCState refuses, naming the argument (single process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.compression import DGCState


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _state(model: nn.Module) -> dict:
    state = DGCState(model, density=0.1).state_dict()
    state["residuals"] = {n: torch.randn(p.numel()) for n, p in model.named_parameters()}
    state["momenta"] = {n: torch.randn(p.numel()) for n, p in model.named_parameters()}
    return state


def test_a_process_group_given_as_a_backend_name_is_a_type_error():
    with pytest.raises(TypeError, match="`process_group` must be a torch.distributed.ProcessGroup or None.*'gloo'"):
        DGCState(_model(), process_group="gloo")


def test_sparse_embeddings_are_refused_naming_them():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"sparse=True \(0\)"):
        DGCState(model)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda s: s["residuals"]["0.weight"].__setitem__(3, float("nan")), "'0.weight' holds non-finite values"),
    (lambda s: s["momenta"]["2.bias"].__setitem__(0, float("inf")), "'2.bias' holds non-finite values"),
    (lambda s: s["residuals"].update({"9.weight": torch.zeros(4)}), "names no parameter of the bound model"),
    (lambda s: s["momenta"].update({"0.weight": torch.zeros(4)}), "has 4 elements, the parameter has 512"),
    (lambda s: s.pop("step"), r"`state_dict\['step'\]` must be an int >= 0, got None"),
    (lambda s: s.pop("residuals"), r"`state_dict\['residuals'\]` must be a dict of tensors"),
])
def test_a_corrupt_state_is_refused_and_changes_nothing(edit, match):
    model = _model()
    live = DGCState(model, density=0.1)
    good = _state(model)
    live.load_state_dict(good)
    before = {k: {n: t.clone() for n, t in live.state_dict()[k].items()} for k in ("residuals", "momenta")}
    bad = _state(model)
    edit(bad)
    with pytest.raises(ValueError, match=match):
        live.load_state_dict(bad)
    after = live.state_dict()
    for k in before:
        assert all(torch.equal(before[k][n], after[k][n]) for n in before[k])


@pytest.mark.parametrize(("full", "match"), [
    ({"version": 2, "ranks": []}, r"`full\['ranks'\]` holds no rank's state.*got \[\]"),
    ({"version": 2, "ranks": None}, r"`full\['ranks'\]` holds no rank's state.*got None"),
    ({"version": 2}, "must come from DGCState.full_state_dict"),
    ({"version": 2, "ranks": [{"version": 2}, {"version": 2}]}, r"`full\['ranks'\]\[0\]\['residuals'\]`"),
])
def test_load_full_state_dict_refuses_what_holds_no_state(full, match):
    with pytest.raises(ValueError, match=match):
        DGCState(_model(), density=0.1).load_full_state_dict(full)


def test_the_mean_of_other_world_sizes_is_checked_before_merging():
    """The Lightning path (another world size): each saved rank is checked, NaN included."""
    model = _model()
    a, b = _state(model), _state(model)
    b["momenta"]["0.weight"][0] = float("nan")
    live = DGCState(model, density=0.1)
    with pytest.warns(UserWarning, match="saved on 2 ranks"), pytest.raises(ValueError, match="non-finite"):
        live.load_full_state_dict({"version": 2, "world_size": 2, "ranks": [a, b]})
    assert live.residuals == {} and live.momenta == {}
    b = _state(model)
    b["residuals"].pop("2.bias")
    with pytest.warns(UserWarning, match="saved on 2 ranks"), pytest.raises(ValueError, match=r"\[1\]\['residuals'\]"):
        live.load_full_state_dict({"version": 2, "world_size": 2, "ranks": [a, b]})
    with pytest.warns(UserWarning, match="saved on 2 ranks"):
        live.load_full_state_dict({"version": 2, "world_size": 2, "ranks": [a, _state(model)]})
    assert set(live.residuals) == {n for n, _ in model.named_parameters()}
