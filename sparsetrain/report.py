"""One-page PNG report of a run, from its ``metrics.csv`` and ``summary.json``.

The loss (training and validation) and a summary table come first; every other logged
metric that changes gets a small panel of its own, so a component's figures (sparsity,
compression ratio, mask flips, ...) appear without the report knowing about it. Runs with
mixture-of-experts layers (``MoEMonitor``'s ``moe/<layer>/load_e<i>``) get a row with each
layer's expert load over time.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from pathlib import Path

__all__ = ["expert_loads", "load_summary", "read_metrics", "summary_table", "write_report"]

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


_LOAD = re.compile(r"moe/(.+)/load_e(\d+)")


def expert_loads(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[list[tuple[int, float]]]]:
    """MoEMonitor's expert loads: ``{layer: [series of expert 0, series of expert 1, ...]}``, each series
    ``[(step, fraction of the layer's assignments), ...]`` (layers in name order; {} when none logged)."""
    found: dict[str, dict[int, list[tuple[int, float]]]] = defaultdict(dict)
    for key, values in series.items():
        m = _LOAD.fullmatch(key)
        if m:
            found[m.group(1)][int(m.group(2))] = values
    return {layer: [per[e] for e in sorted(per)] for layer, per in sorted(found.items())}


_PREFERRED = ("sparsity", "density", "ratio", "flip", "bytes", "regrown", "itop", "drop")


def _panels(series: dict[str, list[tuple[int, float]]], limit: int) -> list[str]:
    """Metrics to draw, one panel each: those that change, preferred names first."""
    keys = [
        k for k in sorted(series)
        if k not in _SKIP and not k.startswith("lr-") and not _LOAD.fullmatch(k) and len({v for _, v in series[k]}) > 1
    ]
    rank = {k: next((i for i, word in enumerate(_PREFERRED) if word in k), len(_PREFERRED)) for k in keys}
    return sorted(keys, key=lambda k: (rank[k], k))[:limit]


def load_summary(run_dir: str | Path) -> dict:
    """The run's ``summary.json`` as a dict ({} when the run has none).

    Raises:
        ValueError: ``run_dir`` is not a directory, or its ``summary.json`` is not a JSON object.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"`run_dir` must be an existing run directory, got {str(run_dir)!r}")
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def write_report(run_dir: str | Path, out: str | Path | None = None, max_panels: int = 6) -> Path:
    """Draw ``report.png`` (or ``out``) for the run in ``run_dir``; return its path.

    The top row holds the loss curves and the summary table; below it, one small panel per
    logged metric that changed during the run (component metrics such as sparsity,
    compression ratio or mask flips), at most ``max_panels``; for runs with masks (dynamic
    sparsity, N:M), a row with each layer's achieved sparsity (``summary.json``'s
    ``layer_sparsity``); for runs with MoE layers, a last row with the expert load over time
    (one panel per layer, at most three: each expert's share of the assignments, stacked).

    Raises:
        ValueError: ``run_dir`` is not a directory, has no ``metrics.csv``, or a bad ``summary.json``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise ValueError(f"`run_dir` must contain metrics.csv, got {str(run_dir)!r}")
    series = read_metrics(metrics_path)
    keys = _panels(series, max_panels)
    layers = {f"{comp}: {name}": v for comp, per in (summary.get("layer_sparsity") or {}).items()
              for name, v in per.items() if isinstance(v, (int, float))}
    loads = expert_loads(series)
    rows = 1 + math.ceil(len(keys) / 3) + (1 if layers else 0) + (1 if loads else 0)
    fig = plt.figure(figsize=(13, 3.4 * rows + 0.6))
    grid = fig.add_gridspec(rows, 3)

    ax = fig.add_subplot(grid[0, :2])
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)

    text_ax = fig.add_subplot(grid[0, 2])
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, summary_table(summary), family="monospace", fontsize=8, va="top")

    for i, key in enumerate(keys):
        ax = fig.add_subplot(grid[1 + i // 3, i % 3])
        steps, values = zip(*series[key])
        ax.plot(steps, values)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
    if layers:
        ax = fig.add_subplot(grid[rows - 1 - (1 if loads else 0), :])
        names = list(layers)
        ax.barh(range(len(names)), [layers[n] for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=max(4, 9 - len(names) // 8))
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("achieved sparsity (share of zeros in the mask)")
        ax.set_title("per-layer sparsity at the end", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    shown = list(loads)[:3]
    for i, layer in enumerate(shown):
        ax = fig.add_subplot(grid[rows - 1, i] if len(shown) > 1 else grid[rows - 1, :])
        per = loads[layer]
        steps = sorted({s for e in per for s, _ in e})
        stacks = [[dict(e).get(s, float("nan")) for s in steps] for e in per]
        ax.stackplot(steps, stacks, labels=[f"e{i}" for i in range(len(per))])
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"expert load, {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("share of assignments", fontsize=8)
        if len(per) <= 16:
            ax.legend(fontsize=6, ncol=max(1, len(per) // 4), loc="lower right")
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
    configs = summary.get("component_configs") or {}
    for comp, stats in (summary.get("component_summaries") or {}).items():
        target = ", ".join(f"{k}={v}" for k, v in (configs.get(comp) or {}).items()
                           if k in ("method", "sparsity", "density", "n", "m"))
        if target:
            rows.append((f"{comp} (configured)", target[:40]))
        for key, value in (stats or {}).items():
            if isinstance(value, (dict, list, tuple)) or "/layer" in key:
                continue
            rows.append((f"{comp}.{key}", f"{value:.4g}" if isinstance(value, float) else str(value)[:24]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
