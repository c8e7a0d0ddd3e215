"""One-page PNG report of a run, from its ``metrics.csv`` and ``summary.json``.

Panel 1 is the loss (training and validation). Every other logged metric is grouped
by the prefix before its first ``/`` (components log ``sparsity/...``,
``compression/...``, ``nm/...``), one panel per group, so a component's figures appear
without the report knowing about it.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["read_metrics", "summary_table", "write_report"]

_SKIP = {"step", "epoch", "train_loss", "val_loss"}


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSV log (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    v = float(value)
                except ValueError:
                    continue
                if math.isfinite(v):
                    series[key].append((step, v))
    return dict(series)


def _groups(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(series):
        if key in _SKIP or key.startswith("lr-"):
            continue
        groups[key.split("/", 1)[0] if "/" in key else "other"].append(key)
    return dict(groups)


def write_report(run_dir: str | Path, out: str | Path | None = None, max_panels: int = 6) -> Path:
    """Draw ``report.png`` (or ``out``) for the run in ``run_dir``; return its path.

    Raises:
        ValueError: ``run_dir`` has no ``metrics.csv``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise ValueError(f"`run_dir` must contain metrics.csv, got {str(run_dir)!r}")
    series = read_metrics(metrics_path)
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    groups = list(_groups(series).items())[: max_panels - 2]
    n_panels = 2 + len(groups)
    cols = 2
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.6 * rows), squeeze=False)
    axes = axes.ravel()

    ax = axes[0]
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)

    for ax, (group, keys) in zip(axes[1:], groups):
        for key in keys[:8]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key.split("/", 1)[-1])
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    text_ax = axes[1 + len(groups)]
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, summary_table(summary), family="monospace", fontsize=9, va="top")
    for ax in axes[2 + len(groups):]:
        ax.axis("off")
    fig.suptitle(f"sparsetrain run: {summary.get('recipe', run_dir.name)}")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def summary_table(summary: dict) -> str:
    """A short plain-text table of a run's summary."""
    if not summary:
        return "(no summary.json)"
    rows = [
        ("recipe", summary.get("recipe")),
        ("steps", summary.get("steps")),
        ("processes", summary.get("world_size")),
        ("parameters", f"{summary.get('parameters', 0):,}"),
        ("fit time", f"{summary.get('fit_seconds', float('nan')):.1f} s"),
        ("final val loss", f"{summary.get('final_val_loss', float('nan')):.4f}"),
        ("components", ", ".join(summary.get("components") or []) or "none"),
    ]
    for comp, stats in (summary.get("component_summaries") or {}).items():
        for key, value in stats.items():
            rows.append((f"{comp}.{key}", f"{value:.4g}" if isinstance(value, float) else value))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
