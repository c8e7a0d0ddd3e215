"""Dense against 2:4 on one model: the table ``sparsetrain bench-export`` prints.

Times prefill forwards (batch 1) at a few token counts, eagerly and through
:func:`~sparsetrain.runtime.capture`, checks the 2:4 model's outputs against the dense one's, and
counts the bytes of the layers that :func:`~sparsetrain.runtime.sparsify_model` swapped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .capture import capture
from .linear import Sparse24Linear
from .sparsify import sparse_layers

__all__ = ["compare", "example_input", "format_report", "layer_bytes"]


def example_input(model: nn.Module, tokens: int, device: torch.device | str) -> tuple[torch.Tensor, int]:
    """A batch-1 input of ``tokens`` tokens for ``model`` and its token dim.

    Token ids ``[1, T]`` when the model's first module with weights is an ``nn.Embedding``, else
    activations ``[1, T, in_features]`` of its first Linear in the model's dtype.

    Raises:
        ValueError: the model has neither.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (1, tokens), device=device), 1
        if isinstance(module, (nn.Linear, Sparse24Linear)):
            dtype = module.weight.dtype if module.weight is not None else module.packed.dtype
            return torch.randn(1, tokens, module.in_features, device=device, dtype=dtype), 1
    raise ValueError(f"cannot build an input for {type(model).__name__}: no nn.Embedding or Linear in it")


def layer_bytes(model: nn.Module, names: Sequence[str]) -> int:
    """Bytes of the tensors (parameters and buffers) held by the modules ``names`` of ``model``."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
        total += sum(t.numel() * t.element_size() for t in seen.values())
    return total


def _time_ms(fn, device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        from .timing import cuda_ms

        return cuda_ms(fn, reps=reps)
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def compare(dense: nn.Module, ours: nn.Module, token_counts: Sequence[int], *, reps: int = 10,
            graphs: bool = True) -> dict[str, Any]:
    """Time ``dense`` and ``ours`` (the same model, 2:4 layers swapped in) at each token count.

    Returns ``{"rows": [...], "layers": {name: kind}, "dense_bytes": int, "ours_bytes": int}``;
    each row has ``tokens``, ``dense_eager_ms``, ``ours_eager_ms``, ``dense_graph_ms``,
    ``ours_graph_ms`` (None without CUDA or ``graphs``) and ``max_abs_diff`` (ours against dense).
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"`reps` must be an int >= 1, got {reps!r}")
    if not token_counts or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in token_counts):
        raise ValueError(f"`token_counts` must be ints >= 1, got {token_counts!r}")
    device = next(iter([*ours.parameters(), *ours.buffers()]), torch.empty(0)).device
    kinds = sparse_layers(ours)
    rows = []
    graphs = graphs and device.type == "cuda"
    example, token_dim = example_input(dense, token_counts[0], device)
    captured = {}
    if graphs:
        for label, model in (("dense", dense), ("ours", ours)):
            captured[label] = capture(model, example, token_counts=token_counts, token_dim=token_dim)
    with torch.no_grad():
        for tokens in token_counts:
            x, _ = example_input(dense, tokens, device)
            row: dict[str, Any] = {"tokens": tokens}
            row["dense_eager_ms"] = _time_ms(lambda: dense(x), device, reps)  # noqa: B023
            row["ours_eager_ms"] = _time_ms(lambda: ours(x), device, reps)  # noqa: B023
            for label in ("dense", "ours"):
                c = captured.get(label)
                row[f"{label}_graph_ms"] = None if c is None else _time_ms(lambda: c(x), device, reps)  # noqa: B023
            ref = dense(x).float()
            out = (captured["ours"] if graphs else ours)(x).float()
            row["max_abs_diff"] = (out - ref).abs().max().item()
            row["max_abs_ref"] = ref.abs().max().item()
            rows.append(row)
    names = list(kinds)
    return {"rows": rows, "layers": kinds, "dense_bytes": layer_bytes(dense, names),
            "ours_bytes": layer_bytes(ours, names), "device": str(device)}


def format_report(result: dict[str, Any]) -> str:
    """The table of :func:`compare`'s result, as text."""

    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    def speed(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None else f"{a / b:.2f}x"

    kinds: dict[str, int] = {}
    for kind in result["layers"].values():
        kinds[kind] = kinds.get(kind, 0) + 1
    lines = [
        "2:4 layers: " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"),
        f"their memory: {result['ours_bytes'] / 2**20:.1f} MiB against {result['dense_bytes'] / 2**20:.1f} MiB dense"
        + (f" ({result['ours_bytes'] / result['dense_bytes']:.3f}x)" if result["dense_bytes"] else ""),
    ]
    header = ["tokens", "dense eager", "2:4 eager", "speed-up", "dense graph", "2:4 graph", "speed-up",
              "max |2:4 - dense|"]
    table = [header]
    for r in result["rows"]:
        table.append([str(r["tokens"]), cell(r["dense_eager_ms"]), cell(r["ours_eager_ms"]),
                      speed(r["dense_eager_ms"], r["ours_eager_ms"]), cell(r["dense_graph_ms"]),
                      cell(r["ours_graph_ms"]), speed(r["dense_graph_ms"], r["ours_graph_ms"]),
                      f"{r['max_abs_diff']:.3g} (of {r['max_abs_ref']:.3g})"])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("ms per forward, batch 1 (graph: through sparsetrain.runtime.capture)")
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table)
    return "\n".join(lines)
