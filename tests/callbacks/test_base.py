"""The callbacks' shared base: arguments from the config's fields, state before setup, state keys."""

import dataclasses
import inspect

import pytest
from sparsetrain.callbacks import GradientCompression, NMSparsity

from sparsetrain.compression import DGCConfig
from sparsetrain.nm import NMConfig


@pytest.mark.parametrize("cls, config, own", [
    (GradientCompression, DGCConfig, {"log_every_n_steps", "fresh_state_ok"}),
    (NMSparsity, NMConfig, {"decay_steps", "decay_fraction", "stages", "finalize", "log_stats", "fresh_state_ok"}),
])
def test_signature_is_the_config_fields_plus_own_arguments(cls, config, own):
    params = inspect.signature(cls).parameters
    fields = {f.name for f in dataclasses.fields(config) if f.init} - set(cls._hidden_fields)
    assert set(params) == fields | own
    for f in dataclasses.fields(config):
        if f.name in params and f.name not in own:
            assert params[f.name].default == f.default, f.name
            assert not isinstance(params[f.name].annotation, str), f.name


@pytest.mark.parametrize("cls", [GradientCompression, NMSparsity])
def test_unknown_argument_names_it(cls):
    with pytest.raises(TypeError, match="unexpected argument `densty`"):
        cls(densty=0.1)


def test_config_built_from_keywords():
    assert GradientCompression(density=0.02, momentum=0.9).config == DGCConfig(density=0.02, momentum=0.9)
    with pytest.raises(ValueError, match="density"):
        GradientCompression(density=2.0)


def test_state_before_setup_is_kept_and_returned():
    cb = GradientCompression()
    assert cb.state_dict() == {}
    cb.load_state_dict({"version": 2, "ranks": None})
    assert cb.state_dict() == {"version": 2, "ranks": None}
    assert cb.take_pending() == {"version": 2, "ranks": None} and cb.take_pending() is None


def test_state_keys_differ_per_layers_and_fall_back_to_the_class_name():
    a, b = NMSparsity(include=["a"]), NMSparsity(include=["b"])
    assert a.state_key != b.state_key
    assert a._legacy_state_key == b._legacy_state_key == "NMSparsity"
    assert GradientCompression().state_key == "GradientCompression"
