"""SET mask update (Mocanu et al. 2018, "Scalable training of artificial neural networks with
adaptive sparse connectivity inspired by network science", Alg. 1).

Per layer: drop the ``n_drop`` active weights closest to zero (smallest |W|), regrow as
many at uniformly random positions among those not kept. The random scores come from a
``torch.Generator`` that every rank seeds and advances alike, so all ranks draw the same
positions. They are drawn on the generator's device: with a CPU generator the draw is
independent of the weight's device (on CUDA the scores are drawn into pinned memory and copied
without waiting for the device); with a generator on the weight's device they never leave it
(what :class:`~sparsetrain.sparsity.DynamicSparsifier` does on accelerators, where a CPU draw
costs ~10 ns per weight: ~0.4 s per update for the 42.6M weights of the GPU benchmark).
Ties in |W| are broken by position (see :mod:`.masks`).

Shape suffixes: ``L`` layers updated together, ``N`` positions of one flattened layer.
"""

from __future__ import annotations

import torch

from .masks import _select_rows

__all__ = ["set_update"]


def set_update(
    weight: torch.Tensor, mask: torch.Tensor, n_drop: int, generator: torch.Generator, *, n_active: int | None = None
) -> torch.Tensor:
    """Drop the ``n_drop`` smallest-magnitude active weights, regrow as many at random.

    Args:
        weight: the layer's weight.
        mask: current bool mask, same shape.
        n_drop: connections to replace, in [0, mask.sum()].
        generator: a CPU generator, or one on the weight's device; one ``torch.rand(weight.shape)``
            draw is taken from it whenever ``n_drop > 0``.
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
    scores = torch.empty(mask.shape, device=mask.device)
    _draw_growth_scores(scores, generator)
    rows = _set_rows(weight.reshape(1, -1), mask.reshape(1, -1), scores.view(1, -1), n_drop, n_active)
    return rows.view_as(mask)


def _draw_growth_scores(out: torch.Tensor, generator: torch.Generator) -> None:
    """Fill ``out`` with ``torch.rand`` scores from ``generator``, the draw :func:`set_update` takes.

    Drawn on the generator's device when that is ``out``'s device, else on the CPU and copied
    (from pinned memory, without waiting, when ``out`` is on CUDA). A contiguous ``out`` gets the
    numbers ``torch.rand(out.shape, generator=generator)`` would give, so filling the rows of one
    tensor in turn draws what one draw per row would.
    """
    if generator.device == out.device:
        torch.rand(out.shape, generator=generator, out=out)
        return
    pinned = out.device.type == "cuda"
    out.copy_(torch.rand(out.shape, generator=generator, dtype=out.dtype, pin_memory=pinned), non_blocking=pinned)


def _set_rows(
    weight_LN: torch.Tensor, mask_LN: torch.Tensor, scores_LN: torch.Tensor | None, n_drop: int, n_active: int
) -> torch.Tensor:
    """:func:`set_update` of ``L`` layers at once, one per row, from drawn growth scores (none drawn
    when ``n_drop`` is 0); each row holds ``n_active`` active positions; nothing is checked.
    """
    if n_drop == 0 or scores_LN is None:
        assert n_drop == 0, "growth scores are needed when n_drop > 0"
        return mask_LN.clone()
    kept = mask_LN & ~_select_rows(weight_LN.detach().abs(), mask_LN, n_drop, n_active, largest=False)
    n_free = mask_LN.shape[1] - (n_active - n_drop)
    return kept | _select_rows(scores_LN, ~kept, n_drop, n_free, largest=True)
