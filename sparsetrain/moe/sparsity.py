"""Dynamic sparsity on stacked expert weights: densities, masks and updates per expert slice.

Legend: E experts (the stacked dimension), ``...`` one expert's weight shape (``F x D`` for ``w1_EFD``).

A stacked ``[E, F, D]`` weight holds E independent ``F x D`` matrices. Read as one 3-D tensor, an
Erdős–Rényi-Kernel density would count E as a fan dimension (``(E + F + D) / (E F D)``: the same
experts would get another density in a stack of 4 than in a stack of 8, 1.8x at F=24, D=16) and a top-k
over the whole stack would let one expert's large weights or gradients take the places of the
others. Here every expert slice is a layer of its own: its ERK score is that of an ``F x D`` matrix,
its active count is its own, and RigL / SET / magnitude updates select within the slice. The pure
functions of :mod:`sparsetrain.sparsity` (``layer_active_counts``, ``random_mask``, ``rigl_update``,
``set_update``) do the work, one slice at a time.

``DynamicSparsifier`` itself masks the ``weight`` of selected modules and does not select expert
stacks (their parameters are ``w1_EFD``, ...): use these functions in a training loop for expert
weights (docs/moe.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ..sparsity.density import layer_active_counts, layer_densities
from ..sparsity.masks import random_mask
from ..sparsity.rigl import rigl_update
from ..sparsity.set import set_update

__all__ = ["expert_active_counts", "expert_densities", "expert_random_masks", "expert_slice_shapes",
           "update_expert_masks"]


def expert_slice_shapes(shapes: Mapping[str, Sequence[int]], stacked: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with every stacked name ``n`` of shape ``[E, ...]`` replaced by E entries ``"n.<e>"`` of
    shape ``[...]`` (in order), the other names kept.

    Raises:
        ValueError: a stacked name is not in ``shapes``, or its slices have fewer than 2 dimensions.
    """
    stacked = set(stacked)
    unknown = sorted(stacked - set(shapes))
    if unknown:
        raise ValueError(f"`stacked` names {unknown} are not in `shapes`")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if name in stacked:
            if len(shape) < 3:
                raise ValueError(f"`shapes[{name!r}]` must be [E, ...] with slices of >= 2 dimensions, got {shape}")
            out.update({f"{name}.{e}": shape[1:] for e in range(shape[0])})
        else:
            out[name] = shape
    return out


def expert_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk",
                     stacked: Iterable[str] = ()) -> dict[str, float]:
    """:func:`~sparsetrain.sparsity.layer_densities` with every stacked weight read as its E slices; a
    stacked name gets its slices' density (the same for every slice: they have one shape)."""
    stacked = set(stacked)
    per = layer_densities(expert_slice_shapes(shapes, stacked), sparsity, distribution)
    return {name: per[f"{name}.0"] if name in stacked else per[name] for name in shapes}


def expert_active_counts(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk",
                         stacked: Iterable[str] = ()) -> dict[str, int | list[int]]:
    """:func:`~sparsetrain.sparsity.layer_active_counts` with every stacked weight read as its E slices: a
    stacked name gets one count per expert (they may differ by one, from the exact rounding of the total)."""
    stacked = set(stacked)
    per = layer_active_counts(expert_slice_shapes(shapes, stacked), sparsity, distribution)
    return {name: [per[f"{name}.{e}"] for e in range(int(shape[0]))] if name in stacked else per[name]
            for name, shape in shapes.items()}


def _check_counts(name: str, counts: Sequence[int], E: int) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != E:
        raise ValueError(f"`{name}` must hold one count per expert ({E}), got {len(counts)}")
    return counts


def expert_random_masks(shape: Sequence[int], counts: Sequence[int], generator: torch.Generator,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask of ``shape = [E, ...]`` whose slice e has exactly ``counts[e]`` random active positions
    (:func:`~sparsetrain.sparsity.random_mask` per slice, drawn in expert order from ``generator``).

    Raises:
        ValueError: ``counts`` does not hold E entries, or one is outside [0, slice size].
    """
    shape = tuple(int(d) for d in shape)
    counts = _check_counts("counts", counts, shape[0])
    return torch.stack([random_mask(shape[1:], c, generator, device) for c in counts])


@torch.no_grad()
def update_expert_masks(method: str, weight: torch.Tensor, mask: torch.Tensor, n_drop: Sequence[int], *,
                        grad: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One RigL or SET update of a stacked weight, every expert slice on its own.

    Args:
        method: ``"rigl"`` (drop the smallest |W|, grow by the dense |grad|) or ``"set"`` (grow at random).
        weight: the stacked ``[E, ...]`` weight.
        mask: its bool mask, same shape.
        n_drop: connections each expert replaces (its own share: E entries).
        grad: the dense gradient (RigL).
        generator: the random growth's generator (SET); one draw per expert, in expert order.

    Returns:
        The new mask: slice e is ``rigl_update`` / ``set_update`` of slice e (each keeps its active count).

    Raises:
        ValueError: an unknown method, mismatched shapes, ``n_drop`` without E entries, a missing ``grad``
            (RigL) or ``generator`` (SET).
    """
    if method not in ("rigl", "set"):
        raise ValueError(f"`method` must be 'rigl' or 'set', got {method!r}")
    if weight.shape != mask.shape or weight.dim() < 3:
        raise ValueError(f"`weight` and `mask` must share one [E, ...] shape of >= 3 dimensions, got "
                         f"{tuple(weight.shape)} and {tuple(mask.shape)}")
    n_drop = _check_counts("n_drop", n_drop, weight.shape[0])
    if method == "rigl":
        if grad is None or grad.shape != weight.shape:
            raise ValueError(f"`grad` of shape {tuple(weight.shape)} is needed for RigL, got "
                             f"{None if grad is None else tuple(grad.shape)}")
        return torch.stack([rigl_update(weight[e], grad[e], mask[e], n) for e, n in enumerate(n_drop)])
    if generator is None:
        raise ValueError("`generator` is needed for SET")
    return torch.stack([set_update(weight[e], mask[e], n, generator) for e, n in enumerate(n_drop)])
