"""The training runner: outputs, resume equality, DDP through the harness."""

from __future__ import annotations

import json

import pytest
import torch

from sparsetrain.recipe import parse_recipe
from tests.harness import run_distributed

pytestmark = pytest.mark.slow


def _recipe(max_steps: int, every: int = 0, seed: int = 0):
    return parse_recipe({
        "version": 1,
        "name": "tiny",
        "model": {"name": "mlp", "in_features": 64, "hidden": 64, "n_classes": 8},
        "data": {"name": "synthetic_classification", "n": 1024, "batch_size": 32},
        "trainer": {"devices": 2, "max_steps": max_steps, "val_check_interval": 5, "limit_val_batches": 2,
                    "log_every_n_steps": 1, "checkpoint_every_n_steps": every, "seed": seed},
        "optimizer": {"name": "adamw", "lr": 0.01, "warmup_steps": 3},
    })


def _train_ranks(rank, world_size, out, steps_list, every):
    from sparsetrain.train import train

    for steps in steps_list:
        train(_recipe(steps, every), out, max_steps=steps, report=False)
    state = torch.load(f"{out}/checkpoints/last.ckpt", weights_only=True)
    return {k: v.clone() for k, v in state["state_dict"].items()}, state["global_step"]


def test_resumed_run_equals_uninterrupted(tmp_path):
    # 1024 samples * 7/8 / (2 ranks * 32) = 13 batches per epoch: stop mid-epoch 1, resume into epoch 2.
    full = run_distributed(_train_ranks, 2, str(tmp_path / "full"), [20], 0, lightning=True, timeout=240)
    resumed = run_distributed(_train_ranks, 2, str(tmp_path / "resumed"), [9, 20], 0, lightning=True, timeout=240)
    (state_full, step_full), (state_res, step_res) = full[0], resumed[0]
    assert step_full == step_res == 20
    for key in state_full:
        torch.testing.assert_close(state_res[key], state_full[key], rtol=0, atol=0, msg=key)
    # Both ranks hold the same parameters (DDP), and training moved them.
    fresh = run_distributed(_train_ranks, 2, str(tmp_path / "one"), [1], 0, lightning=True, timeout=240)[0][0]
    assert any(not torch.equal(fresh[k], state_full[k]) for k in state_full)


def test_outputs_written(tmp_path):
    out = tmp_path / "run"
    run_distributed(_train_ranks, 2, str(out), [6], 3, lightning=True, timeout=240)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train_loss" in header and "val_loss" in header
