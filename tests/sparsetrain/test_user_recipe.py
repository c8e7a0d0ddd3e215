"""Recipes naming the user's own classes by ``class_path``: parsed, checked and trained on 2 ranks."""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrain.components import RecipeError
from sparsetrain.recipe import parse_recipe
from tests.harness import run_distributed

PKG = "tests.sparsetrain.userpkg.models"

COMPONENTS = {
    "dynamic_sparsity": {"name": "dynamic_sparsity", "method": "rigl", "sparsity": 0.5, "update_every": 2,
                         "include": ["model.left", "model.right.*"]},
    "nm_sparsity": {"name": "nm_sparsity", "n": 2, "m": 4,
                    "include": ["model.left", "model.right.*", "model.head"]},
    "gradient_compression": {"name": "gradient_compression", "density": 0.1, "warmup_steps": 2},
}


def _raw(component: str | None = None, *, model=None, data=None, steps: int = 6, **sections):
    return {
        "version": 1,
        "name": "user",
        "model": model or {"class_path": f"{PKG}.TwoTower", "init_args": {"width": 32}, "loss": "cross_entropy"},
        "data": data or {"class_path": f"{PKG}.Blobs", "init_args": {"n": 512, "batch_size": 16}},
        "trainer": {"devices": 2, "max_steps": steps, "val_check_interval": 3, "limit_val_batches": 2,
                    "log_every_n_steps": 1, "checkpoint_every_n_steps": 3},
        "callbacks": [COMPONENTS[component]] if component else [],
        **sections,
    }


def test_user_classes_parse():
    r = parse_recipe(_raw())
    assert r.model.class_path == f"{PKG}.TwoTower" and r.model.init_args == {"width": 32}
    assert r.data.class_path == f"{PKG}.Blobs"


def test_colon_form_and_demo_data_alias():
    r = parse_recipe(_raw(model={"class_path": f"{PKG}:TwoTower"}, data={"name": "synthetic_classification"}))
    assert r.data.name == "synthetic_classification" and r.data.class_path is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model": {"class_path": "no_such_pkg.Net"}}, r"^model\.class_path: cannot import module 'no_such_pkg'"),
        ({"model": {"class_path": f"{PKG}.Missing"}}, r"^model\.class_path: module '.*' has no class 'Missing'"),
        ({"model": {"class_path": "Net"}}, r"^model\.class_path: must look like 'package\.module\.Class'"),
        ({"model": {"class_path": "os.system; x.Y"}}, r"^model\.class_path: must look like"),
        ({"model": {"class_path": f"{PKG}.NotAModel"}}, r"^model\.class_path: .* not a subclass of torch\.nn"),
        ({"data": {"class_path": f"{PKG}.TwoTower"}}, r"^data\.class_path: .* not a subclass of .*LightningDataModule"),
        ({"model": {"class_path": f"{PKG}.TwoTower", "init_args": {"depth": 3}}},
         r"^model\.init_args\.depth: unknown argument of TwoTower; allowed: features, width, classes"),
        ({"data": {"class_path": f"{PKG}.Blobs", "init_args": {"batch": 3}}}, r"^data\.init_args\.batch: unknown"),
        ({"model": {"class_path": f"{PKG}.TwoTower", "hidden": 3}}, r"^model\.hidden: a demo field"),
        ({"model": {"class_path": f"{PKG}.TwoTower", "loss": "hinge"}}, r"^model\.loss: must be one of"),
        ({"model": {"name": "mlp", "loss": "mse"}}, r"^model\.loss: only applies with `model\.class_path`"),
        ({"model": {"class_path": f"{PKG}.TowerTask", "loss": "mse"}}, r"^model\.loss: .* is a LightningModule"),
        ({"model": {"class_path": f"{PKG}.TowerTask"}, "optimizer": {"lr": 0.1}}, r"^optimizer: .* LightningModule"),
        ({"model": {"class_path": f"{PKG}.TwoTower", "init_args": [1]}}, r"^model\.init_args: expected dict"),
    ],
)
def test_bad_user_classes(changes, match):
    raw = _raw()
    raw.update(changes)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(raw)


def _train_user(rank, world_size, raw, out):
    from sparsetrain.train import train

    summary = train(parse_recipe(raw), out, report=False)
    state = torch.load(f"{out}/checkpoints/last.ckpt", weights_only=True)
    return summary, {k: v.clone() for k, v in state["state_dict"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_user_model_trains_with_each_component(tmp_path, component):
    out = tmp_path / component
    results = run_distributed(_train_user, 2, _raw(component), str(out), lightning=True, timeout=300)
    (summary, state0), (_, state1) = results
    assert summary["steps"] == 6 and summary["world_size"] == 2
    for key in state0:  # DDP: both ranks hold the same weights
        torch.testing.assert_close(state0[key], state1[key], rtol=0, atol=0, msg=key)
    written = json.loads((out / "summary.json").read_text())
    assert written["steps"] == 6
    if component == "nm_sparsity":  # the checkpoint holds the dense weights and the masks: take the N:M view
        from sparsetrain.nm import nm_export_checkpoint

        state0 = nm_export_checkpoint(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True))
    weights = {k: v for k, v in state0.items() if k.endswith("weight") and v.dim() == 2}
    assert set(weights) >= {"model.left.weight", "model.right.0.weight", "model.head.weight"}
    if component == "dynamic_sparsity":
        for name in ("model.left.weight", "model.right.0.weight"):
            assert (weights[name] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name
        assert (weights["model.head.weight"] == 0).float().mean().item() < 0.1  # not included
        layers = written["layer_sparsity"]["DynamicSparsity"]
        assert set(layers) == {"model.left.weight", "model.right.0.weight"}
        assert all(v == pytest.approx(0.5, abs=0.02) for v in layers.values()), layers
        achieved = written["component_summaries"]["DynamicSparsity"]
        assert achieved["sparsity/global"] == pytest.approx(0.5, abs=0.02)
    if component == "nm_sparsity":
        for name in ("model.left.weight", "model.right.0.weight", "model.head.weight"):
            groups = (weights[name] != 0).reshape(-1, 4).sum(1)
            assert int(groups.max()) == 2, name
    if component == "gradient_compression":
        stats = written["component_summaries"]["GradientCompression"]
        assert written["component_configs"]["GradientCompression"]["density"] == 0.1
        assert any("ratio" in k or "wire_bytes" in k for k in stats), stats  # achieved, not configured


@pytest.mark.slow
def test_user_lightning_module_trains(tmp_path):
    raw = _raw(model={"class_path": f"{PKG}.TowerTask", "init_args": {"width": 32}})
    results = run_distributed(_train_user, 2, raw, str(tmp_path / "lm"), lightning=True, timeout=300)
    assert results[0][0]["steps"] == 6
    assert "net.left.weight" in results[0][1]
