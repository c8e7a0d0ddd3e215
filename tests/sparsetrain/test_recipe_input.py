"""Recipe files and --set overrides that are wrong: one-line errors naming the key path or the file."""

from __future__ import annotations

import pytest

from sparsetrain.components import RecipeError
from sparsetrain.recipe import apply_overrides, load_recipe, parse_recipe

BASE = {"version": 1, "model": {"name": "mlp"}, "data": {"name": "synthetic_classification"},
        "callbacks": [{"name": "dynamic_sparsity", "sparsity": 0.5}]}


def test_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\ntrainer:\n  max_steps: 10\n  devices: 1\n  max_steps: 20\n")
    with pytest.raises(RecipeError, match=r"^max_steps: duplicate key \(line 3 and line 5\)"):
        load_recipe(path)


def test_duplicate_top_level_section_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\ntrainer: {max_steps: 10}\ntrainer: {max_steps: 20}\n")
    with pytest.raises(RecipeError, match=r"^trainer: duplicate key"):
        load_recipe(path)


@pytest.mark.parametrize("content", [b"\x00\x01\x02version: 1", b"\x89PNG\r\n\x1a\n\xff\xfe"])
def test_binary_file_is_named(tmp_path, content):
    path = tmp_path / "recipe.bin"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=r"recipe\.bin: (a binary file|not UTF-8 text)"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", "..", ".", "", "x" * 200, "a b"])
def test_run_name_is_confined(name):
    with pytest.raises(RecipeError, match=r"^name: must be a plain run name"):
        parse_recipe({**BASE, "name": name})


def test_plain_run_names_pass():
    assert parse_recipe({**BASE, "name": "rigl-0.8_v2"}).name == "rigl-0.8_v2"


def test_set_glob_value_is_a_string_not_a_yaml_alias():
    data = apply_overrides(BASE, ["callbacks[0].include=*.mlp.*"])
    assert data["callbacks"][0]["include"] == "*.mlp.*"
    assert BASE["callbacks"][0] == {"name": "dynamic_sparsity", "sparsity": 0.5}  # the input is not changed


def test_set_glob_list_value():
    data = apply_overrides(BASE, ["callbacks[0].include=['*.fc1', '*.fc2']"])
    assert data["callbacks"][0]["include"] == ["*.fc1", "*.fc2"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("callbacks[0].include=[*.mlp.*]",
         r"^callbacks\[0\]\.include: --set value '\[\*\.mlp\.\*\]' is not valid YAML"),
        ("callbacks[5].sparsity=0.1", r"^callbacks\[5\]: --set: no list entry 5 \(the list has 1\)"),
        ("callbacks[x].sparsity=0.1", r"list index \[x\] must be an integer"),
        ("callbacks[-1].sparsity=0.1", r"list index \[-1\] must be >= 0"),
        ("model[0]=1", r"^model\[0\]: --set indexes \[0\] into a dict, not a list"),
        ("trainer[0]=1", r"^trainer\[0\]: --set: no list entry 0 \(the list has 0\)"),
        ("version.sub=1", r"^version\.sub: --set goes into version, which is a int \(1\), not a mapping"),
        ("callbacks[0].sparsity.x=1", r"^callbacks\[0\]\.sparsity\.x: --set goes into callbacks\[0\]\.sparsity"),
        ("trainer.max_steps", r"expected KEY\.PATH=VALUE"),
        ("=3", r"empty key path"),
        ("trainer..x=3", r"cannot read the key path"),
    ],
)
def test_bad_set_is_one_line_with_the_key_path(override, match):
    with pytest.raises(RecipeError, match=match) as info:
        apply_overrides(BASE, [override])
    assert "\n" not in str(info.value)


def test_set_glob_then_type_checked_with_the_key_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodel: {name: mlp}\ndata: {name: synthetic_classification}\n"
                    "callbacks:\n  - {name: dynamic_sparsity, sparsity: 0.5}\n")
    with pytest.raises(RecipeError, match=r"^callbacks\[0\]\.include"):
        load_recipe(path, ["callbacks[0].include=*.nothing.*"])


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"optimizer": {"lr": float("nan")}}, r"^optimizer\.lr: `lr` must be > 0, got nan"),
        ({"optimizer": {"lr": float("inf")}}, r"^optimizer\.lr: `lr` must be finite, got inf"),
        ({"optimizer": {"weight_decay": float("nan")}}, r"^optimizer\.weight_decay: `weight_decay` must be >= 0"),
        ({"optimizer": {"weight_decay": float("inf")}}, r"^optimizer\.weight_decay: `weight_decay` must be finite"),
    ],
)
def test_nonfinite_optimizer_values(section, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe({**BASE, **section})
