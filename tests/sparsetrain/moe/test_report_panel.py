"""The report's expert-load panel, on a small synthetic metrics file of MoEMonitor's statistics."""

from __future__ import annotations

import json

from sparsetrain.report import _panels, expert_loads, read_metrics, write_report

LAYERS = ["blocks.0.mlp", "blocks.1.mlp"]


def _load(layer: int, expert: int, step: int) -> float:
    """Expert loads that drift toward balance, summing to 1 over the 4 experts of a layer."""
    base = [0.55, 0.25, 0.15, 0.05] if layer == 0 else [0.1, 0.2, 0.3, 0.4]
    return base[expert] + (0.25 - base[expert]) * step / 10


def _write(run_dir, with_moe: bool):
    cols = ["epoch", "step", "train_loss"]
    if with_moe:
        cols += [f"moe/{n}/load_e{e}" for n in LAYERS for e in range(4)] + ["moe/imbalance"]
    rows = [",".join(cols)]
    for step in range(1, 11):
        row = ["0", str(step), f"{4 - 0.1 * step:.3f}"]
        if with_moe:
            row += [f"{_load(i, e, step):.6f}" for i in range(2) for e in range(4)] + [f"{2.2 - 0.1 * step:.3f}"]
        rows.append(",".join(row))
    (run_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"recipe": "moe", "steps": 10}))


def _png_height(path):
    return int.from_bytes(path.read_bytes()[20:24], "big")


def test_expert_loads_read_back_per_layer_and_expert(tmp_path):
    _write(tmp_path, True)
    series = read_metrics(tmp_path / "metrics.csv")
    loads = expert_loads(series)
    assert list(loads) == LAYERS
    for i, layer in enumerate(LAYERS):
        assert len(loads[layer]) == 4
        for e, points in enumerate(loads[layer]):
            assert [s for s, _ in points] == list(range(1, 11))
            assert all(abs(v - _load(i, e, s)) < 1e-6 for s, v in points)
    # the per-expert loads go to the load panel, not one generic panel each
    assert _panels(series, 6) == ["moe/imbalance"]
    assert expert_loads(read_metrics(_write(tmp_path, False) or tmp_path / "metrics.csv")) == {}


def test_report_has_the_expert_load_row(tmp_path):
    with_moe, without = tmp_path / "a", tmp_path / "b"
    with_moe.mkdir()
    without.mkdir()
    _write(with_moe, True)
    _write(without, False)
    a, b = write_report(with_moe), write_report(without)
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one row for the imbalance panel and one for the expert loads
    assert _png_height(a) > _png_height(b) + 2 * 250
