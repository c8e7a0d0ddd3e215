"""RigL mask update (Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", Alg. 1).

Per layer, at an update step with drop fraction ``f``::

    n_drop = floor(f * n_active)
    kept   = top-(n_active - n_drop) active positions by |W|
    grown  = top-n_drop positions NOT in kept by |dense gradient|

(ties broken by position, see :mod:`.masks`), so a dropped position may be regrown at once
(it then keeps its value, as the reference ``reinit_when_same=False`` does); connections
that were inactive before the update start at zero, with zeroed optimizer state (that is
done by the caller, :mod:`.dynamic`). The dense gradient is the gradient of the loss of the
*masked* forward with respect to every weight, active or not.

Cost: two selections of ``n_drop`` elements (the smallest active |W|, the largest free |grad|),
each one ``torch.topk`` of size ``n_drop`` plus a few elementwise passes; with ``n_active``
given, no device-to-host synchronisation. Layers of one shape and count can be updated together
(:func:`_rigl_rows`, what the sparsifier does): one pass for all of them, the same masks.

Shape suffixes: ``L`` layers updated together, ``N`` positions of one flattened layer.
"""

from __future__ import annotations

import torch

from .masks import _select_rows

__all__ = ["rigl_update"]


def rigl_update(
    weight: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, n_drop: int, *, n_active: int | None = None
) -> torch.Tensor:
    """Drop the ``n_drop`` smallest-magnitude active weights, grow as many by dense-gradient magnitude.

    Args:
        weight: the layer's weight (its values at inactive positions are ignored).
        grad: the dense gradient of the masked forward, same shape.
        mask: current bool mask, same shape.
        n_drop: connections to replace, in [0, mask.sum()].
        n_active: ``mask.sum()`` if the caller knows it (it then is not counted, which saves a
            device-to-host synchronisation); it must be exact.

    Returns:
        The new bool mask, with as many active positions as ``mask``; ties in |W| or |grad| are
        broken by position (lower flat index kept / grown first).

    Raises:
        ValueError: mismatched shapes or ``n_drop`` out of range.
    """
    if weight.shape != mask.shape or grad.shape != mask.shape:
        raise ValueError(
            f"`weight`, `grad` and `mask` must have one shape, got {tuple(weight.shape)}, "
            f"{tuple(grad.shape)}, {tuple(mask.shape)}"
        )
    if n_active is None:
        n_active = int(mask.sum())
    if not 0 <= n_drop <= n_active:
        raise ValueError(f"`n_drop` must be in [0, {n_active}] (the active count), got {n_drop}")
    return _rigl_rows(weight.reshape(1, -1), grad.reshape(1, -1), mask.reshape(1, -1), n_drop, n_active).view_as(mask)


def _rigl_rows(
    weight_LN: torch.Tensor, grad_LN: torch.Tensor, mask_LN: torch.Tensor, n_drop: int, n_active: int
) -> torch.Tensor:
    """:func:`rigl_update` of ``L`` layers at once, one per row; each row holds ``n_active`` active positions.

    Nothing is checked (the caller did); row ``i`` of the result is ``rigl_update`` of row ``i``.
    """
    if n_drop == 0:
        return mask_LN.clone()
    dropped = _select_rows(weight_LN.detach().abs(), mask_LN, n_drop, n_active, largest=False)
    kept = mask_LN & ~dropped
    n_free = mask_LN.shape[1] - (n_active - n_drop)
    return kept | _select_rows(grad_LN.detach().abs(), ~kept, n_drop, n_free, largest=True)
