"""Every component through the same generic checks of the contract (docs/architecture.md).

A new component is added to ``COMPONENTS`` and gets every check below: construction from keyword
arguments, ``step()``, ``statistics()`` keys and types, ``masks()``, the ``state_dict`` round trip and
an exact resume, a differing config refused naming the field, the rank check, and ``remove()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from sparsetrain import contract
from sparsetrain.compression import DGCConfig, DGCState, MaskedExchange, MaskedExchangeConfig
from sparsetrain.moe import MoE, MoEBalancer, MoEBalancerConfig
from sparsetrain.nm import NMConfig, NMSparsifier
from sparsetrain.sparsity import DynamicSparsifier, DynamicSparsityConfig
from tests.data.make_release1_checkpoints import UserNet  # a user's three-Linear model
from tests.harness import DistributedRunError, run_distributed, state_digest


@dataclasses.dataclass
class Spec:
    cls: type
    config_cls: type
    kwargs: dict[str, Any]  # config fields
    extra: dict[str, Any]  # construction keywords that are not config fields
    namespace: str  # prefix of every statistics() key
    math_field: tuple[str, Any]  # a field that changes the math, and another value for it
    has_masks: bool
    model: Any = UserNet  # the model it is attached to (made with the same seed)


class UserMoENet(UserNet):
    """The user's model with its middle layer a top-2 MoE with aux-loss-free selection biases."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = MoE(32, 32, num_experts=4, k=2, bias_update_rate=1e-2)


COMPONENTS = {
    "dynamic": Spec(DynamicSparsifier, DynamicSparsityConfig,
                    dict(method="set", sparsity=0.5, update_every=2, include=["body", "mid"], seed=3),
                    dict(total_steps=12), "sparsity/", ("sparsity", 0.7), True),
    "topkast": Spec(DynamicSparsifier, DynamicSparsityConfig,
                    dict(method="topkast", sparsity=0.7, backward_extra=0.2, update_every=2, include=["body", "mid"]),
                    dict(total_steps=12), "sparsity/", ("backward_extra", 0.1), True),
    "nm": Spec(NMSparsifier, NMConfig, dict(n=2, m=4, method="srste", include=["mid"]), {}, "nm/", ("m", 8), True),
    "dgc": Spec(DGCState, DGCConfig, dict(density=0.1, warmup_steps=2), {}, "compression/", ("density", 0.2), False),
    "exchange": Spec(MaskedExchange, MaskedExchangeConfig, dict(verify_every=0), {}, "exchange/",
                     ("compression", dict(density=0.1, warmup_steps=2)), False),
    "moe": Spec(MoEBalancer, MoEBalancerConfig, dict(update_every=2, verify_every=3), {}, "moe/",
                ("update_every", 1), False, UserMoENet),
}


def _build(spec: Spec, init_seed: int = 0, **overrides):
    torch.manual_seed(init_seed)
    model = spec.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    component = spec.cls(model, optimizer=opt, **{**spec.kwargs, **overrides}, **spec.extra)
    return model, opt, component


def _train(model, opt, steps):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()



@pytest.fixture(params=sorted(COMPONENTS))
def spec(request) -> Spec:
    return COMPONENTS[request.param]


def test_construct_from_config_or_fields_not_both(spec):
    model, _, from_fields = _build(spec)
    config = spec.config_cls(**spec.kwargs)
    assert dataclasses.is_dataclass(config)
    torch.manual_seed(0)
    other = spec.model()
    from_config = spec.cls(other, config, **spec.extra)
    assert from_config.config == from_fields.config
    with pytest.raises(ValueError, match="not both"):
        spec.cls(spec.model(), config, **spec.kwargs)
    assert from_fields in contract.attached(model)


def test_bad_config_field_names_the_field(spec):
    name = spec.math_field[0]
    with pytest.raises((ValueError, TypeError), match=name):
        spec.cls(spec.model(), **{**spec.kwargs, name: "not a number"}, **spec.extra)


def test_step_and_statistics_are_flat_floats(spec):
    model, opt, component = _build(spec)
    _train(model, opt, range(3))
    assert component.step() is None
    stats = component.statistics()
    assert stats, "statistics() is empty"
    for key, value in stats.items():
        assert isinstance(key, str) and key.startswith(spec.namespace), key
        assert type(value) is float, (key, type(value))


def test_masks_keyed_by_parameter_name(spec):
    model, opt, component = _build(spec)
    _train(model, opt, range(2))
    masks = component.masks()
    assert isinstance(masks, dict)
    assert bool(masks) == spec.has_masks
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        assert attr == "weight" and module_name in modules, name
        assert mask.dtype == torch.bool and mask.shape == modules[module_name].weight.shape
    version, gradient_masks = contract.gradient_masks(model)
    assert set(gradient_masks) == (set(masks) if component.masks_gradients else set())


def test_state_dict_round_trip_resumes_exactly(spec):
    model, opt, component = _build(spec)
    _train(model, opt, range(8))
    full = state_digest(model)

    model, opt, component = _build(spec)
    _train(model, opt, range(4))
    state = component.state_dict()
    assert isinstance(state.get("version"), int) and isinstance(state.get("config"), dict)
    stats = component.statistics()
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "component": state}
    model, opt, component = _build(spec, init_seed=1)  # other initial weights: everything comes from the state
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    component.load_state_dict(saved["component"])
    assert component.statistics() == stats
    _train(model, opt, range(4, 8))
    assert state_digest(model) == full


def test_differing_math_field_is_refused(spec):
    _, _, component = _build(spec)
    state = component.state_dict()
    name, value = spec.math_field
    _, _, other = _build(spec, **{name: value})
    with pytest.raises(ValueError, match=name):
        other.load_state_dict(state)


def test_remove_leaves_a_plain_model(spec):
    model, opt, component = _build(spec)
    _train(model, opt, range(3))
    plain_keys = set(spec.model().state_dict())
    component.remove()
    assert set(model.state_dict()) == plain_keys
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    assert contract.attached(model) == []
    out = model(torch.randn(2, 16))  # still a working model
    assert out.shape == (2, 4)


def test_a_layer_claimed_twice_is_refused():
    model = UserNet()
    DynamicSparsifier(model, method="static", sparsity=0.5, include=["mid"], total_steps=4)
    with pytest.raises(ValueError, match="mid.weight"):
        NMSparsifier(model, n=2, m=4, include=["mid"])


def _diverging_rank(rank, world, name):
    spec = COMPONENTS[name]
    if name == "dgc":  # a rank configured differently
        _, _, component = _build(spec, density=0.1 * (rank + 1))
    elif name == "exchange":  # a rank that counted another optimizer step
        _, _, component = _build(spec)
        for _ in range(rank):
            component.step()
    elif name == "moe":  # a rank whose selection bias moved on its own
        model, _, component = _build(spec)
        model.mid.router.selection_bias_E[rank] += 1e-3
    elif name == "dynamic":  # masks drawn from another seed
        _, _, component = _build(spec, seed=rank)  # the config's seed
    elif name == "topkast":  # other initial weights, hence other magnitude sets
        _, _, component = _build(spec, init_seed=rank)
    else:  # other initial weights, hence other N:M masks
        torch.manual_seed(rank)
        component = NMSparsifier(UserNet(), **spec.kwargs, verify_now=False)
    try:
        component.check_ranks()
    except contract.RankDivergenceError as err:
        return str(err)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_rank_check_raises_the_one_exception(name):
    try:
        messages = run_distributed(_diverging_rank, 2, name, timeout=120)
    except DistributedRunError as err:  # pragma: no cover - shows the rank's traceback
        raise AssertionError(str(err)) from None
    assert all(m is not None and "differ" in m for m in messages), messages
