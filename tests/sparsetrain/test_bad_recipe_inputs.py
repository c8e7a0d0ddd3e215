"""Bad recipes, overrides and arguments given to `sparsetrain train`: one clear line, exit 2, nothing written."""

from __future__ import annotations

import pytest
import yaml

from sparsetrain.cli import main

PKG = "tests.sparsetrain.userpkg.models"
GOOD = {"version": 1, "name": "ok", "model": {"name": "mlp"}, "data": {"name": "synthetic_classification"},
        "trainer": {"devices": 1, "max_steps": 2},
        "callbacks": [{"name": "dynamic_sparsity", "sparsity": 0.5}]}


def _with(**changes):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            out[section][key] = value
        else:
            out[section] = value
    return out


CASES = [
    # (recipe mapping or raw text, extra args, expected fragment)
    (_with(version=2), [], "version: must be 1, got 2"),
    (_with(trainr={}), [], "trainr: unknown key"),
    (_with(trainer__max_steps=0), [], "trainer.max_steps: `max_steps` must be >= 1"),
    (_with(trainer__max_steps="10"), [], "trainer.max_steps: expected int"),
    (_with(trainer__devices=0), [], "trainer.devices: `devices` must be >= 1"),
    (_with(trainer__strategy="fsdp"), [], "trainer.strategy: must be one of"),
    (_with(trainer__precision="8-true"), [], "trainer.precision: must be one of"),
    (_with(trainer__deterministic="no"), [], "trainer.deterministic: expected bool"),
    (_with(trainer__progress_every_n_steps=-1), [], "trainer.progress_every_n_steps: `progress_every_n_steps`"),
    (_with(optimizer={"lr": float("nan")}), [], "optimizer.lr: `lr` must be > 0, got nan"),
    (_with(optimizer={"lr": float("inf")}), [], "optimizer.lr: `lr` must be finite"),
    (_with(optimizer={"weight_decay": float("nan")}), [], "optimizer.weight_decay: `weight_decay` must be >= 0"),
    (_with(optimizer={"name": "lamb"}), [], "optimizer.name: must be one of"),
    (_with(model={"name": "resnet"}), [], "model.name: must be one of"),
    (_with(model={"class_path": "no_such_pkg.Net"}), [], "model.class_path: cannot import module 'no_such_pkg'"),
    (_with(model={"class_path": f"{PKG}.NotAModel"}), [], "model.class_path: "),
    (_with(model={"class_path": f"{PKG}.TwoTower", "init_args": {"depth": 1}}), [], "model.init_args.depth: unknown"),
    (_with(model={"class_path": f"{PKG}.TwoTower", "init_args": {"width": -1}}), [],
     "model.init_args: TwoTower refused them"),
    (_with(data={"class_path": f"{PKG}.TwoTower"}), [], "data.class_path: "),
    (_with(name="../../x"), [], "name: must be a plain run name"),
    (_with(name="a/b"), [], "name: must be a plain run name"),
    (_with(callbacks=[{"name": "dynamic_sparsity", "sparsity": 1.5}]), [], "callbacks[0].sparsity"),
    (_with(callbacks=[{"name": "dynamic_sparsity", "sparsity": 0.5, "include": ["nothing.*"]}]), [],
     "callbacks[0].include: `include` pattern 'nothing.*' matches no layer"),
    (_with(callbacks=[{"name": "nm_sparsity", "m": 7}]), [], "callbacks[0]"),
    (_with(callbacks=[{"name": "dynamic_sparsity", "sparsity": 0.5}, {"name": "nm_sparsity"}]), [],
     "callbacks[1].include: layers also sparsified by callbacks[0]"),
    (_with(callbacks=[{"name": "gradient_compression", "density": 0}]), [], "callbacks[0].density"),
    (_with(callbacks=[{"name": "no_such"}]), [], "callbacks[0].name: unknown component 'no_such'"),
    (_with(callbacks="dynamic_sparsity"), [], "callbacks: expected a list"),
    ("version: 1\nversion: 1\n", [], "version: duplicate key"),
    ("version: 1\ntrainer: {max_steps: 3, max_steps: 4}\n", [], "max_steps: duplicate key"),
    ("version: [1\n", [], "not valid YAML"),
    ("- 1\n- 2\n", [], "recipe: expected a mapping at the top level"),
    (b"\x00\x01binary", [], "a binary file, not a YAML recipe"),
    (b"\xff\xfe\xfa", [], "not UTF-8 text"),
    (GOOD, ["--set", "callbacks[0].include=[*.x]"], "callbacks[0].include: --set value"),
    (GOOD, ["--set", "callbacks[2].sparsity=0.1"], "callbacks[2]: --set: no list entry 2"),
    (GOOD, ["--set", "callbacks[a].sparsity=0.1"], "list index [a] must be an integer"),
    (GOOD, ["--set", "version.x=1"], "version.x: --set goes into version"),
    (GOOD, ["--set", "trainer.max_steps"], "expected KEY.PATH=VALUE"),
    (GOOD, ["--set", "optimizer.lr=.nan"], "optimizer.lr: `lr` must be > 0, got nan"),
    (GOOD, ["--set", "callbacks[0].include=*.none.*"], "callbacks[0].include: `include` must be a list"),
    (GOOD, ["--max-steps", "0"], "--max-steps: must be >= 1, got 0"),
    (GOOD, ["--devices", "0"], "--devices: must be >= 1, got 0"),
]


@pytest.mark.parametrize(("recipe", "args", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_train_refuses_and_writes_nothing(tmp_path, capsys, recipe, args, expected):
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    before = path.read_bytes()
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsetrain: invalid recipe: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists() and path.read_bytes() == before


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "`recipe` must be an existing YAML file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
