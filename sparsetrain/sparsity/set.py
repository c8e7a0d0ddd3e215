"""SET mask update (Mocanu et al. 2018, "Scalable training of artificial neural networks with
adaptive sparse connectivity inspired by network science", Alg. 1).

Per layer: drop the ``n_drop`` active weights closest to zero (smallest |W|), regrow as
many at uniformly random positions among those not kept. The random scores come from a
``torch.Generator`` that every rank seeds and advances alike, so all ranks draw the same
positions; they are drawn on the CPU, which makes the draw independent of the device (on
CUDA they are drawn into pinned memory and copied without waiting for the device). Ties in |W|
are broken by position (see :mod:`.masks`).
"""

from __future__ import annotations

import torch

from .masks import drop_smallest, grow_mask

__all__ = ["set_update"]


def set_update(
    weight: torch.Tensor, mask: torch.Tensor, n_drop: int, generator: torch.Generator, *, n_active: int | None = None
) -> torch.Tensor:
    """Drop the ``n_drop`` smallest-magnitude active weights, regrow as many at random.

    Args:
        weight: the layer's weight.
        mask: current bool mask, same shape.
        n_drop: connections to replace, in [0, mask.sum()].
        generator: a CPU generator; one ``torch.rand(weight.shape)`` draw is taken from it
            whenever ``n_drop > 0``.
        n_active: ``mask.sum()`` if the caller knows it (it then is not counted, which saves a
            device-to-host synchronisation); it must be exact.

    Returns:
        The new bool mask, with as many active positions as ``mask``.

    Raises:
        ValueError: mismatched shapes or ``n_drop`` out of range.
    """
    if weight.shape != mask.shape:
        raise ValueError(f"`weight` and `mask` must have one shape, got {tuple(weight.shape)}, {tuple(mask.shape)}")
    if n_active is None:
        n_active = int(mask.sum())
    if not 0 <= n_drop <= n_active:
        raise ValueError(f"`n_drop` must be in [0, {n_active}] (the active count), got {n_drop}")
    if n_drop == 0:
        return mask.clone()
    kept = mask & ~drop_smallest(weight.detach().abs(), mask, n_drop, n_active=n_active)
    pinned = mask.device.type == "cuda"
    scores = torch.rand(weight.shape, generator=generator, pin_memory=pinned).to(mask.device, non_blocking=pinned)
    return kept | grow_mask(scores, kept, n_drop, n_kept=n_active - n_drop)
