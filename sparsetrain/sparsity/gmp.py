"""Gradual magnitude pruning step (Zhu & Gupta 2017, "To prune, or not to prune").

At each pruning step the layer keeps its ``n_keep`` largest-magnitude active weights; the
schedule of ``n_keep`` (the cubic sparsity ramp) lives in :mod:`.schedules`. Masks only
shrink: a pruned weight never comes back.
"""

from __future__ import annotations

import torch

from .masks import _select_rows

__all__ = ["magnitude_prune"]


def magnitude_prune(
    weight: torch.Tensor, mask: torch.Tensor, n_keep: int, *, n_active: int | None = None
) -> torch.Tensor:
    """Keep the ``n_keep`` largest-|W| active weights of ``mask``.

    Args:
        weight: the layer's weight.
        mask: current bool mask, same shape.
        n_keep: active weights to keep; clamped to the current active count (masks never grow).
        n_active: ``mask.sum()`` if the caller knows it (it then is not counted, which saves a
            device-to-host synchronisation); it must be exact.

    Returns:
        The new bool mask, a subset of ``mask`` (ties in |W| broken by position, see :mod:`.masks`).

    Raises:
        ValueError: mismatched shapes or a negative ``n_keep``.
    """
    if weight.shape != mask.shape:
        raise ValueError(f"`weight` and `mask` must have one shape, got {tuple(weight.shape)}, {tuple(mask.shape)}")
    if n_keep < 0:
        raise ValueError(f"`n_keep` must be >= 0, got {n_keep}")
    if n_active is None:
        n_active = int(mask.sum())
    return _prune_rows(weight.reshape(1, -1), mask.reshape(1, -1), n_keep, n_active).view_as(mask)


def _prune_rows(weight_LN: torch.Tensor, mask_LN: torch.Tensor, n_keep: int, n_active: int) -> torch.Tensor:
    """:func:`magnitude_prune` of ``L`` layers at once, one per row (``L``: layers, ``N``: positions),
    each row holding ``n_active`` active positions; nothing is checked.
    """
    if n_keep >= n_active:
        return mask_LN.clone()
    return _select_rows(weight_LN.detach().abs(), mask_LN, n_keep, n_active, largest=True)
