"""`sparsetrain check` builds the model and the layer selections: what would fail in every rank fails here."""

from __future__ import annotations

import os

import pytest
import yaml

from sparsetrain.cli import main
from sparsetrain.components import RecipeError
from sparsetrain.recipe import parse_recipe
from sparsetrain.train import check_recipe

PKG = "tests.sparsetrain.userpkg.models"


def _recipe(*callbacks, devices=1, **model):
    return parse_recipe({
        "version": 1,
        "model": model or {"class_path": f"{PKG}.TwoTower", "init_args": {"width": 30}},
        "data": {"name": "synthetic_classification"},
        "trainer": {"devices": devices},
        "callbacks": list(callbacks),
    })


def test_builds_the_model_on_meta_and_lists_the_layers():
    lines = check_recipe(_recipe({"name": "dynamic_sparsity", "sparsity": 0.5, "include": ["model.left"]}))
    assert lines[0].startswith("model: ModelTask built on meta, ")
    assert lines[1] == "callbacks[0] dynamic_sparsity: 1 layer(s): model.left"


@pytest.mark.parametrize(
    ("callbacks", "match"),
    [
        ([{"name": "dynamic_sparsity", "sparsity": 0.5, "include": ["left"]}],
         r"^callbacks\[0\]\.include: `include` pattern 'left' matches no layer .*layers: model\.left, model\.right\.0"),
        ([{"name": "nm_sparsity", "include": ["model.head"]}],
         r"^callbacks\[0\]\.m: `m`=4 divides the reduction dim of none of the selected layers: model\.head \(K=30\)"),
        ([{"name": "dynamic_sparsity", "sparsity": 0.5, "exclude": ["*.nothing"]}],
         r"^callbacks\[0\]\.exclude: `exclude` pattern"),
        ([{"name": "dynamic_sparsity", "sparsity": 0.5, "include": ["model.left", "model.right.*"]},
          {"name": "nm_sparsity", "include": ["model.left"]}],
         r"^callbacks\[1\]\.include: layers also sparsified by callbacks\[0\]: model\.left"),
    ],
)
def test_layer_selection_fails_at_check(callbacks, match):
    with pytest.raises(RecipeError, match=match):
        check_recipe(_recipe(*callbacks))


def test_too_many_devices():
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(RecipeError, match=rf"^trainer\.devices: {cores + 1} processes asked for, this machine has "
                                          rf"{cores} CPU cores"):
        check_recipe(_recipe(devices=cores + 1))


def test_model_constructor_refusal_is_reported():
    with pytest.raises(RecipeError, match=r"^model\.init_args: TwoTower refused them"):
        check_recipe(_recipe(class_path=f"{PKG}.TwoTower", init_args={"width": -3}))


def _write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("data", "args", "match"),
    [
        ({"optimizer": {"lr": ".nan"}}, [], "optimizer.lr: `lr` must be > 0, got nan"),
        ({}, ["--set", "optimizer.lr=.nan"], "optimizer.lr: `lr` must be > 0, got nan"),
        ({}, ["--set", "optimizer.weight_decay=.nan"], "optimizer.weight_decay: `weight_decay` must be >= 0, got nan"),
        ({}, ["--set", "callbacks[0].include=*.mlp.*"], "callbacks[0].include: `include` must be a list"),
        ({}, ["--set", "callbacks[0].include=[x]"], "callbacks[0].include: `include` pattern 'x' matches no layer"),
        ({}, ["--set", "callbacks[3].sparsity=1"], "callbacks[3]: --set: no list entry 3"),
        ({}, ["--set", "trainer.devices.x=1"], "trainer.devices.x: --set goes into trainer.devices, which is a int"),
        ({}, ["--devices", "4096"], "--devices: 4096 processes asked for"),
    ],
)
def test_check_command_one_line_errors(tmp_path, capsys, data, args, match):
    base = {"version": 1, "model": {"name": "mlp"}, "data": {"name": "synthetic_classification"},
            "trainer": {"devices": 1}, "callbacks": [{"name": "dynamic_sparsity", "sparsity": 0.5}]}
    for key, value in data.items():
        base[key] = {k: (float("nan") if v == ".nan" else v) for k, v in value.items()}
    assert main(["check", _write(tmp_path, base), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetrain: invalid recipe: ") and match in err, err
    assert err.count("\n") == 1


def test_check_command_prints_what_it_built(tmp_path, capsys):
    data = {"version": 1, "model": {"class_path": f"{PKG}.TwoTower"}, "data": {"class_path": f"{PKG}.Blobs"},
            "trainer": {"devices": 1}, "callbacks": [{"name": "nm_sparsity", "include": ["model.left"]}]}
    assert main(["check", _write(tmp_path, data)]) == 0
    out = capsys.readouterr().out
    assert "callbacks[0] nm_sparsity: 1 layer(s): model.left" in out and out.endswith(": ok\n")
