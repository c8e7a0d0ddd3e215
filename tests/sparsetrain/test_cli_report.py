"""The `sparsetrain` command line and the PNG report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparsetrain.cli import main
from sparsetrain.report import read_metrics, summary_table, write_report


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


def _fake_run(run_dir):
    rows = ["epoch,step,train_loss,val_loss,sparsity/global,compression/density"]
    for step in range(1, 21):
        rows.append(f"0,{step},{4 - step * 0.1:.3f},,{min(0.8, step * 0.05):.3f},{0.01}")
        if step % 10 == 0:
            rows.append(f"0,{step},,{3.9 - step * 0.1:.3f},,")
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "recipe": "fake", "steps": 20, "world_size": 2, "parameters": 1000, "fit_seconds": 3.0,
        "final_val_loss": 1.9, "components": ["dynamic_sparsity"],
        "component_summaries": {"DynamicSparsity": {"global_sparsity": 0.8}},
    }))


def test_report_draws_every_metric_group(tmp_path):
    _fake_run(tmp_path)
    series = read_metrics(tmp_path / "metrics.csv")
    assert len(series["train_loss"]) == 20 and len(series["val_loss"]) == 2
    path = write_report(tmp_path)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = summary_table(json.loads((tmp_path / "summary.json").read_text()))
    assert "DynamicSparsity.global_sparsity  0.8" in table


def test_report_needs_metrics(tmp_path):
    with pytest.raises(ValueError, match="`run_dir` must contain metrics.csv"):
        write_report(tmp_path)
