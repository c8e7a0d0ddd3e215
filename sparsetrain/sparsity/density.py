"""Layer-wise densities for a global sparsity target: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

Pure functions over weight shapes; nothing here touches a model.

ER / ERK (Mocanu et al. 2018; Evci et al. 2020, "Rigging the Lottery", Sec. 3 and the
``google-research/rigl`` reference ``get_sparsities_erdos_renyi``)::

    raw_l   = sum(shape_l) / prod(shape_l)               (ERK: every dimension, kernel included)
            = (d0 + d1) / (d0 * d1)                       (ER: output and input dims only)
    eps     = ((1 - S) * sum_l N_l - sum_{l dense} N_l) / sum_{l not dense} raw_l * N_l
    d_l     = eps * raw_l                                 (layers not dense)

If some ``d_l`` exceeds 1, every layer with the largest ``raw_l`` is made dense (density 1,
still counted in the budget) and ``eps`` is solved again, until all densities are <= 1.
By construction ``sum_l d_l * N_l == (1 - S) * sum_l N_l``: the global sparsity over the
layers given is exactly ``S``. :func:`layer_active_counts` turns densities into integer
counts whose total is exactly ``round((1 - S) * sum_l N_l)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["DISTRIBUTIONS", "floor_count", "layer_active_counts", "layer_densities"]

DISTRIBUTIONS = ("erk", "er", "uniform")


def floor_count(value: float) -> int:
    """The one rounding rule for weight counts computed from a fraction: ``floor(value + 1e-9)``.

    A count such as ``drop_fraction * n_active`` (RigL/SET's drop count) or ``density * numel`` is
    floored, with a ``1e-9`` guard so that a product meant to be an integer but computed just below
    it in floating point (``0.29 * 100 = 28.999999999999996``) is not floored one short.
    """
    return math.floor(value + 1e-9)


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    dims = list(shape) if distribution == "erk" else list(shape[:2])
    return sum(dims) / math.prod(dims)


def _check(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str) -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"`distribution` must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if not shapes:
        raise ValueError("`shapes` must name at least one layer, got none")
    for name, shape in shapes.items():
        if len(shape) < 2 or any(int(d) < 1 for d in shape):
            raise ValueError(f"`shapes[{name!r}]` must have >= 2 positive dimensions, got {tuple(shape)}")


def layer_densities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk"
) -> dict[str, float]:
    """Per-layer densities whose parameter-weighted mean is ``1 - sparsity``.

    Args:
        shapes: layer name -> weight shape (at least 2-D; ``(out, in)`` for Linear,
            ``(out, in/groups, *kernel)`` for convolutions).
        sparsity: global target sparsity over these layers, in [0, 1).
        distribution: ``"uniform"`` (every layer ``1 - sparsity``), ``"er"`` or ``"erk"``
            (see the module docstring; Evci et al. 2020, Eq. in Sec. 3 "Sparsity distribution").

    Returns:
        layer name -> density in (0, 1]. ``sum(d * N) == (1 - sparsity) * sum(N)`` up to
        floating-point rounding, where ``N`` is each layer's number of weights.

    Raises:
        ValueError: ``sparsity`` outside [0, 1), an unknown ``distribution``, no layers, or a
            shape with fewer than 2 dimensions.

    Example::

        >>> d = layer_densities({"a": (100, 10), "b": (100, 100)}, 0.5, "erk")
        >>> round(d["a"] * 1000 + d["b"] * 10000)
        5500
    """
    _check(shapes, sparsity, distribution)
    density = 1.0 - float(sparsity)
    if distribution == "uniform" or density == 1.0:
        return {name: density for name in shapes}
    numel = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    raw = {name: _raw_score(shape, distribution) for name, shape in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        budget = density * total - sum(numel[n] for n in dense)
        eps = budget / sum(raw[n] * numel[n] for n in sparse)
        max_raw = max(raw[n] for n in sparse)
        if eps * max_raw <= 1.0:
            break
        # The layers with the largest raw score would exceed density 1: make them dense and re-solve.
        dense.update(n for n in sparse if raw[n] == max_raw)
        assert len(dense) < len(shapes), "ERK re-solve made every layer dense below density 1"
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def layer_active_counts(
    shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk"
) -> dict[str, int]:
    """Number of active (kept) weights per layer for a global sparsity target.

    Largest-remainder rounding of ``density_l * N_l`` from :func:`layer_densities`, so that
    the total is exactly ``round((1 - sparsity) * sum(N))`` and every layer keeps at least one
    weight and at most ``N_l``.

    Args:
        shapes: layer name -> weight shape.
        sparsity: global target sparsity, in [0, 1).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.

    Returns:
        layer name -> active count.

    Raises:
        ValueError: as :func:`layer_densities`.
    """
    densities = layer_densities(shapes, sparsity, distribution)
    numel = {name: math.prod(int(d) for d in shape) for name, shape in shapes.items()}
    ideal = {n: densities[n] * numel[n] for n in shapes}
    counts = {n: min(numel[n], max(1, floor_count(ideal[n]))) for n in shapes}
    target = round((1.0 - sparsity) * sum(numel.values()))
    short = target - sum(counts.values())
    # Hand the remaining units to the layers with the largest fractional parts (ties: order given).
    order = sorted(shapes, key=lambda n: ideal[n] - counts[n], reverse=True)
    for n in order:
        if short <= 0:
            break
        if counts[n] < numel[n]:
            counts[n] += 1
            short -= 1
    # The one-weight floor can overshoot on tiny layers: take back from the smallest remainders.
    for n in reversed(order):
        if short >= 0:
            break
        if counts[n] > 1:
            counts[n] -= 1
            short += 1
    return counts
