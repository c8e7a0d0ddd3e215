"""Recipe parsing: valid recipes, every kind of invalid input with its message pinned."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from sparsetrain.components import RecipeError, build_component, register_component
from sparsetrain.recipe import apply_overrides, load_recipe, parse_recipe, recipe_from_record

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def _base(**sections):
    return {"version": 1, **sections}


def test_defaults_are_the_demo():
    r = parse_recipe(_base())
    assert (r.model.name, r.data.name, r.trainer.strategy, r.trainer.devices) == ("gpt", "stdlib_chars", "ddp", 2)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.version == 1


def test_ints_widen_to_float():
    assert parse_recipe(_base(optimizer={"lr": 1})).optimizer.lr == 1.0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], r"^recipe: expected a mapping"),
        ({"model": {}}, r"^version: missing"),
        (_base(version=2), r"^version: must be 1, got 2"),
        (_base(trainr={}), r"^trainr: unknown key; allowed: version, name, model"),
        (_base(trainer={"max_stepz": 3}), r"^trainer\.max_stepz: unknown key; allowed: devices"),
        (_base(trainer={"max_steps": "10"}), r"^trainer\.max_steps: expected int, got str '10'"),
        (_base(trainer={"max_steps": 1.5}), r"^trainer\.max_steps: expected int, got float"),
        (_base(trainer={"max_steps": True}), r"^trainer\.max_steps: expected int, got bool"),
        (_base(trainer={"max_steps": 0}), r"^trainer\.max_steps: `max_steps` must be >= 1, got 0"),
        (_base(trainer={"strategy": "fsdp"}), r"^trainer\.strategy: must be one of 'ddp', 'deepspeed', 'auto'"),
        (_base(trainer={"gradient_clip_val": -1}), r"^trainer\.gradient_clip_val: `gradient_clip_val` must be > 0"),
        (_base(trainer=[1]), r"^trainer: expected a mapping, got list"),
        (_base(model={"d_model": 100}), r"^model\.d_model: `d_model` must be a multiple of 64, got 100"),
        (_base(model={"n_head": 3}), r"^model\.n_head: `n_head` must divide `d_model`"),
        (_base(optimizer={"lr": 0}), r"^optimizer\.lr: `lr` must be > 0, got 0"),
        (_base(optimizer={"momentum": 1.0}), r"^optimizer\.momentum: `momentum` must be in \[0, 1\)"),
        (_base(data={"val_fraction": 0.9}), r"^data\.val_fraction: `val_fraction` must be in \(0, 0.5\)"),
        (_base(model={"name": "mlp"}), r"^data\.name: `data` 'stdlib_chars' does not fit model 'mlp'"),
        (_base(callbacks={"name": "x"}), r"^callbacks: expected a list, got dict"),
        (_base(callbacks=[{"density": 1}]), r"^callbacks\[0\]\.name: missing"),
        (_base(callbacks=[{"name": "no_such_thing"}]), r"^callbacks\[0\]\.name: unknown component 'no_such_thing'"),
        (_base(callbacks=["x"]), r"^callbacks\[0\]: expected a mapping with a `name`"),
    ],
)
def test_invalid_recipes_name_the_key(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


class _Probe:
    """A component for the registry tests."""

    def __init__(self, sparsity: float, method: str = "rigl", layers: list[str] | None = None) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}")
        self.sparsity, self.method, self.layers = sparsity, method, layers


@pytest.fixture
def probe():
    register_component("probe", _Probe)
    yield
    from sparsetrain import components

    components._REGISTRY.pop("probe")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"name": "probe"}, r"^callbacks\[1\]\.sparsity: required by component 'probe'"),
        ({"name": "probe", "sparsity": 1.5}, r"^callbacks\[1\]\.sparsity: `sparsity` must be in \[0, 1\), got 1.5"),
        ({"name": "probe", "sparsity": "high"}, r"^callbacks\[1\]\.sparsity: expected float, got str"),
        ({"name": "probe", "sparsity": 0.5, "sparsty": 1}, r"^callbacks\[1\]\.sparsty: unknown key for component"),
        ({"name": "probe", "sparsity": 0.5, "layers": [1]}, r"^callbacks\[1\]\.layers\[0\]: expected str"),
    ],
)
def test_component_errors_name_the_key_path(probe, entry, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(_base(callbacks=[{"name": "probe", "sparsity": 0.1}, entry]))


def test_component_is_built_with_its_arguments(probe):
    built = build_component({"name": "probe", "sparsity": 0.5, "layers": ["a"]}, "callbacks[0]")
    assert (built.sparsity, built.method, built.layers) == (0.5, "rigl", ["a"])


@pytest.mark.parametrize(("name", "target"), [("not an id", _Probe), ("ok", "no_colon_path"), ("ok", 3)])
def test_register_component_rejects_bad_input(name, target):
    with pytest.raises(ValueError, match="`name`|`target`"):
        register_component(name, target)


def test_overrides_address_nested_keys_and_list_entries():
    data = apply_overrides(_base(callbacks=[{"name": "a", "x": 1}]),
                           ["trainer.max_steps=7", "callbacks[0].x=0.5", "optimizer.name=sgd"])
    assert data["trainer"]["max_steps"] == 7 and data["callbacks"][0]["x"] == 0.5
    assert data["optimizer"]["name"] == "sgd"
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        apply_overrides(_base(), ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="no list entry 3"):
        apply_overrides(_base(callbacks=[]), ["callbacks[3].x=1"])


def test_load_recipe_uses_safe_load(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("version: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(evil)
    with pytest.raises(ValueError, match="`recipe` must be an existing YAML file"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_recorded_recipe_parses_back_to_the_same_recipe(path):
    # what a run's summary.json (and a 2:4 export's config.json) records: every field, None included
    recipe = load_recipe(path)
    record = json.loads(json.dumps(asdict(recipe)))
    assert recipe_from_record(record) == recipe


def test_a_recorded_user_class_recipe_parses_back():
    recipe = parse_recipe(_base(model={"class_path": "torch.nn.Linear", "init_args": {"in_features": 4,
                                                                                     "out_features": 2}}),
                          check_components=False)
    assert recipe_from_record(json.loads(json.dumps(asdict(recipe)))) == recipe


def test_recipe_from_record_refuses_what_is_no_record():
    with pytest.raises(RecipeError, match="recorded recipe: expected a mapping, got list"):
        recipe_from_record([1])
    with pytest.raises(RecipeError, match="version"):
        recipe_from_record({"name": "x"})
