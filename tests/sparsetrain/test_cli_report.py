"""The `sparsetrain` command line and the PNG report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from sparsetrain.cli import main
from sparsetrain.report import _panels, read_metrics, summary_table, write_report


def test_check_accepts_quickstart(capsys):
    assert main(["check", "recipes/quickstart.yaml"]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_reports_the_key_path(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntrainer: {max_steps: -3}\n")
    assert main(["check", str(bad)]) == 2
    assert "trainer.max_steps: `max_steps` must be >= 1, got -3" in capsys.readouterr().err


def test_set_overrides_are_validated(capsys):
    assert main(["check", "recipes/quickstart.yaml", "--set", "optimizer.lr=-1"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-steps" in out.stdout


def _real_summary(run_dir):
    """The summary a DST run writes, made by the code that writes it (not typed in by hand)."""
    import torch
    from sparsetrain.callbacks import DynamicSparsity

    from sparsetrain.recipe import parse_recipe
    from sparsetrain.sparsity import DynamicSparsifier
    from sparsetrain.train import _summaries, layer_sparsity

    recipe = parse_recipe({"version": 1, "model": {"name": "mlp"}, "data": {"name": "synthetic_classification"},
                           "callbacks": [{"name": "dynamic_sparsity", "method": "rigl", "sparsity": 0.8}]})
    callback = DynamicSparsity(method="rigl", sparsity=0.8)
    torch.manual_seed(0)
    callback.component = DynamicSparsifier(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                                               torch.nn.Linear(16, 4)), callback.config)
    achieved, configured = _summaries(recipe, [callback])
    return {"recipe": "fake", "steps": 20, "world_size": 2, "parameters": 1000, "fit_seconds": 3.0,
            "final_val_loss": 1.9, "components": ["dynamic_sparsity"], "component_summaries": achieved,
            "component_configs": configured, "layer_sparsity": layer_sparsity([callback])}


def _fake_run(run_dir, summary):
    rows = ["epoch,step,train_loss,val_loss,sparsity/global,compression/density"]
    for step in range(1, 21):
        rows.append(f"0,{step},{4 - step * 0.1:.3f},,{min(0.8, step * 0.05):.3f},{0.01}")
        if step % 10 == 0:
            rows.append(f"0,{step},,{3.9 - step * 0.1:.3f},,")
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _png_height(path):
    return int.from_bytes(path.read_bytes()[20:24], "big")


def test_report_draws_every_metric_group(tmp_path):
    summary = _real_summary(tmp_path)
    _fake_run(tmp_path, summary)
    series = read_metrics(tmp_path / "metrics.csv")
    assert len(series["train_loss"]) == 20 and len(series["val_loss"]) == 2
    assert _panels(series, 6) == ["sparsity/global"]  # compression/density never changed: no panel
    path = write_report(tmp_path)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with_layers = _png_height(path)
    _fake_run(tmp_path, {k: v for k, v in summary.items() if k != "layer_sparsity"})
    assert _png_height(write_report(tmp_path)) < with_layers  # the per-layer sparsity row is drawn
    table = summary_table(summary)
    achieved = summary["component_summaries"]["DynamicSparsity"]["sparsity/global"]
    assert re.search(rf"^DynamicSparsity\.sparsity/global +{achieved:.4g}$", table, re.M), table
    assert re.search(r"^DynamicSparsity \(configured\) +method=rigl, sparsity=0\.8$", table, re.M), table
    assert "sparsity/layer/" not in table  # per-layer figures go to the panel, not the table
    assert set(summary["layer_sparsity"]["DynamicSparsity"]) == {"0.weight", "2.weight"}


def test_report_command_on_missing_dir_or_bad_summary(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"sparsetrain report: `run_dir` must be an existing run directory, got " \
                                      f"{str(tmp_path / 'nope')!r}\n"
    (tmp_path / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json: not valid JSON" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json: expected a JSON object, got list" in capsys.readouterr().err


def test_report_needs_metrics(tmp_path):
    with pytest.raises(ValueError, match="`run_dir` must contain metrics.csv"):
        write_report(tmp_path)
