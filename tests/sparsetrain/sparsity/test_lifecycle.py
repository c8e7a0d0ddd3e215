"""DynamicSparsifier follows the component contract of docs/architecture.md."""

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from sparsetrain import contract
from sparsetrain.demo import MLPClassifier
from sparsetrain.sparsity import MASK_NAME, DynamicSparsifier, DynamicSparsityConfig, MaskDivergenceError

STAT_KEYS = {
    "sparsity/global", "sparsity/target", "sparsity/active", "sparsity/total", "sparsity/itop_rate",
    "sparsity/updates", "sparsity/regrown", "sparsity/regrown_total", "sparsity/drop_fraction", "sparsity/step",
}


def _model(seed=0):
    torch.manual_seed(seed)
    return MLPClassifier(in_features=16, hidden=32, n_classes=4)


def _train_step(model, opt, step):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_construct_from_config_fields_or_config_not_both():
    sp = DynamicSparsifier(_model(), method="set", sparsity=0.5, update_every=2, total_steps=4)
    assert sp.config == DynamicSparsityConfig(method="set", sparsity=0.5, update_every=2)
    with pytest.raises(ValueError, match="either `config` or its fields"):
        DynamicSparsifier(_model(), DynamicSparsityConfig(), sparsity=0.5)
    with pytest.raises(TypeError, match="`config` must be a DynamicSparsityConfig, got dict"):
        DynamicSparsifier(_model(), {"sparsity": 0.5})


def test_deprecated_config_names_warn_and_still_read():
    with pytest.warns(FutureWarning, match="`update_interval` is deprecated: use `update_every`"):
        cfg = DynamicSparsityConfig(update_interval=7)
    assert cfg.update_every == 7 and cfg.update_interval == 7
    with pytest.warns(FutureWarning, match="`check_sync` is deprecated"):
        cfg = DynamicSparsityConfig(check_sync=False)
    assert cfg.verify_every == 0 and cfg.check_sync is False
    with pytest.warns(FutureWarning, match="`check_sync` is deprecated"):
        assert DynamicSparsityConfig(check_sync=True).verify_every == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = DynamicSparsityConfig(update_every=3, verify_every=5)
    assert "update_interval" not in dataclasses.asdict(cfg) and "check_sync" not in dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match="`update_interval` must be an int >= 1, got 0"), \
            pytest.warns(FutureWarning):
        DynamicSparsityConfig(update_interval=0)


def test_masks_are_keyed_by_parameter_name_and_gradients_are_masked():
    model = _model()
    sp = DynamicSparsifier(model, method="static", sparsity=0.7, total_steps=4)
    assert DynamicSparsifier.masks_gradients is True
    params = dict(model.named_parameters())
    assert list(sp.masks()) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    for name, mask in sp.masks().items():
        assert mask.dtype == torch.bool and mask.shape == params[name].shape
        assert not params[name][~mask].any()
    version, masks = contract.gradient_masks(model)
    assert masks.keys() == sp.masks().keys() and version == (id(sp), 0)
    root = DynamicSparsifier(nn.Linear(4, 4), method="static", sparsity=0.5)
    assert list(root.masks()) == ["weight"]


def test_mask_version_counts_every_mask_change():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=2, drop_fraction=0.5,
                           end_fraction=1.0, total_steps=6, optimizer=opt)
    seen = []
    for step in range(6):
        before = {n: m.clone() for n, m in sp.masks().items()}
        version = sp.mask_version
        _train_step(model, opt, step)
        changed = any(not torch.equal(before[n], m) for n, m in sp.masks().items())
        assert sp.mask_version == version + changed, step
        seen.append(changed)
    assert any(seen)
    state = sp.state_dict()
    version = sp.mask_version
    model.load_state_dict(model.state_dict())
    assert sp.mask_version == version + 1
    sp.load_state_dict(state)
    assert sp.mask_version == version + 2


def test_static_and_unchanged_updates_keep_the_version():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=1, drop_fraction=0.0,
                           drop_schedule="constant", end_fraction=1.0, total_steps=4, optimizer=opt)
    for step in range(4):
        _train_step(model, opt, step)
    assert sp.update_count == 3 and sp.mask_version == 0


def test_statistics_are_flat_plain_floats_and_step_returns_none():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method="set", sparsity=0.8, update_every=2, end_fraction=1.0,
                           total_steps=6, optimizer=opt, hook_optimizer=False)
    stats = sp.statistics()
    assert set(stats) == STAT_KEYS | {f"sparsity/layer/net.{i}" for i in (0, 2, 4)}
    assert all(type(v) is float for v in stats.values())
    assert stats["sparsity/regrown"] == 0.0 and stats["sparsity/drop_fraction"] == 0.0
    assert stats["sparsity/target"] == 0.8 and stats["sparsity/step"] == 0.0
    for step in range(2):
        _train_step(model, opt, step)
        assert sp.step() is None
    stats = sp.statistics()
    assert stats["sparsity/updates"] == 1.0 and stats["sparsity/step"] == 2.0
    assert stats["sparsity/regrown"] > 0 and stats["sparsity/regrown"] == stats["sparsity/regrown_total"]
    assert stats["sparsity/drop_fraction"] == pytest.approx(0.3 * (1 + torch.cos(torch.tensor(2 / 6 * torch.pi)))
                                                            .item() / 2)
    assert stats["sparsity/active"] == sum(int(m.sum()) for m in sp.masks().values())
    assert all(type(v) is float for v in stats.values())


def test_state_dict_version_2_carries_the_config_and_refuses_a_math_change():
    model = _model()
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, include=["net.*"], total_steps=10)
    state = sp.state_dict()
    assert state["version"] == 2
    assert state["config"]["update_every"] == 100 and state["config"]["include"] == ["net.*"]
    assert state["config"]["module_types"] == [f"torch.nn.modules.{m}" for m in (
        "linear.Linear", "conv.Conv1d", "conv.Conv2d", "conv.Conv3d")]
    torch.save(state, __import__("io").BytesIO())  # serialisable
    sp.load_state_dict(state)  # the same config: fine
    for field, value in [("sparsity", 0.9), ("update_every", 50), ("seed", 3), ("distribution", "uniform")]:
        other = DynamicSparsifier(_model(), **{"method": "rigl", "sparsity": 0.8, "include": ["net.*"],
                                               field: value}, total_steps=10)
        with pytest.raises(ValueError, match=f"saved with {field}="):
            other.load_state_dict(state)
    # fields that do not change the math are not checked
    DynamicSparsifier(_model(), method="rigl", sparsity=0.8, include=["net.*"], verify_every=0,
                      enforce_interval=1, total_steps=10).load_state_dict(state)


def test_a_version_1_state_still_loads():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method="set", sparsity=0.8, update_every=2, total_steps=8, optimizer=opt)
    for step in range(3):
        _train_step(model, opt, step)
    v2 = sp.state_dict()
    # what the previous release wrote: no config, no latest-update figures
    v1 = {k: v for k, v in v2.items() if k not in ("config", "last_update")} | {"version": 1}
    v1["schedule"]["update_interval"] = v2["schedule"]["update_interval"]
    fresh = DynamicSparsifier(_model(), method="set", sparsity=0.8, update_every=2, total_steps=8)
    fresh.model.load_state_dict(model.state_dict())
    fresh.load_state_dict(v1)
    assert fresh.step_count == 3 and fresh.schedule == sp.schedule
    assert all(torch.equal(a, b) for a, b in zip(fresh.masks().values(), sp.masks().values()))
    with pytest.raises(ValueError, match="`state` version must be 1 or 2, got 3"):
        fresh.load_state_dict(v2 | {"version": 3})


def test_check_ranks_is_the_rank_check_and_its_error_is_the_contracts():
    sp = DynamicSparsifier(_model(), method="static", sparsity=0.5)
    sp.check_ranks()  # one process: nothing to compare
    sp.check_masks_in_sync()
    assert issubclass(MaskDivergenceError, contract.RankDivergenceError)


class _Other:
    masks_gradients = False


def test_a_layer_claimed_by_another_component_is_refused_naming_it():
    model = _model()
    other = _Other()
    contract.attach(model, other, claimed=["net.2.weight"])
    with pytest.raises(ValueError, match=r"DynamicSparsifier and _Other both claim 'net.2.weight'"):
        DynamicSparsifier(model, method="static", sparsity=0.5)
    assert not any(hasattr(m, MASK_NAME) for m in model.modules())  # nothing was changed
    sp = DynamicSparsifier(model, method="static", sparsity=0.5, exclude=["net.2"])
    assert contract.claims(model) == {"net.0.weight": sp, "net.2.weight": other, "net.4.weight": sp}


def test_remove_leaves_a_plain_model():
    model = _model()
    plain_keys = set(model.state_dict())
    model._ddp_params_and_buffers_to_ignore = ["user.buffer"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = DynamicSparsifier(model, method="rigl", sparsity=0.8, update_every=1, total_steps=4, optimizer=opt)
    assert set(model.state_dict()) == plain_keys | {f"net.{i}.{MASK_NAME}" for i in (0, 2, 4)}
    _train_step(model, opt, 0)
    masks = {n: m.clone() for n, m in sp.masks().items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    sp.remove()
    assert set(model.state_dict()) == plain_keys
    assert not any(hasattr(m, MASK_NAME) for m in model.modules())
    assert model._ddp_params_and_buffers_to_ignore == ["user.buffer"]
    assert contract.attached(model) == [] and sp.masks() == {}
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name])  # the weights keep their masked values
        if name in masks:
            assert not p[~masks[name]].any()
    assert all(not p._backward_hooks for p in model.parameters())
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_load_state_dict_post_hooks
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    w = model.net[2].weight
    assert w.grad[~masks["net.2.weight"]].any()  # no gradient hook left: dense gradients
    opt.step()  # no step hook left
    assert sp.step_count == 1
    model.load_state_dict(model.state_dict())  # no load hook left
    assert not hasattr(model, "_sparsetrain_components") or contract.attached(model) == []
    DynamicSparsifier(model, method="static", sparsity=0.5)  # the model can be sparsified again
    with pytest.raises(RuntimeError, match="after remove"):
        sp.set_total_steps(4) or sp.step()


def test_remove_without_other_ddp_names_deletes_the_attribute():
    model = _model()
    DynamicSparsifier(model, method="static", sparsity=0.5).remove()
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


@pytest.mark.parametrize(("verify_every", "expected"), [(0, []), (1, [1, 2, 3, 4, 5, 6, 7, 8]), (3, [2, 3, 4, 6])])
def test_ranks_are_checked_after_every_update_and_every_verify_every_steps(monkeypatch, verify_every, expected):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = DynamicSparsifier(model, method="set", sparsity=0.8, update_every=2, end_fraction=0.6,
                           verify_every=verify_every, total_steps=8, optimizer=opt)
    assert sp.schedule.update_steps() == [2, 4]
    checked = []
    monkeypatch.setattr(sp, "check_ranks", lambda: checked.append(sp.step_count))
    for step in range(8):
        _train_step(model, opt, step)
    assert checked == expected
