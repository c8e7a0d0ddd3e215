"""Which weights get a mask, and the exact-count mask primitives the methods are built from.

Everything here is a pure function: it reads tensors or a module tree and returns new
tensors or names; nothing registers buffers or hooks (that is :mod:`.dynamic`).

Masks are ``torch.bool`` tensors of the weight's shape; ``True`` marks an active weight.
Selections are exact and fully determined by the scores, by the one ranking rule of
:mod:`sparsetrain.selection` (which does them): positions are ranked by score, and among equal
scores the lower flat (row-major) index ranks higher; NaN ranks lowest. A selection of ``k``
takes exactly the ``k`` highest- (or lowest-) ranking eligible positions, whatever the ties,
and gives the same mask on every device. Only ``k`` scores go through ``torch.topk``: to keep
90% of the active weights, the 10% to drop are selected (:func:`drop_smallest`) and the rest is
the complement. Nothing here waits for the device when the caller passes the active count.

Shape suffixes: ``L`` layers selected together (rows), ``N`` positions of one flattened layer,
``K`` the selection size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import contract
from ..selection import _select_rows  # RigL, SET and GMP select rows of layers through it

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "drop_smallest",
    "grow_mask",
    "keep_largest",
    "random_mask",
    "select_modules",
]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = contract.LAYER_TYPES


def select_modules(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
) -> list[str]:
    """Names of the modules whose ``weight`` will be sparsified, in registration order.

    The names of :func:`sparsetrain.contract.select_layers` (one glob rule for every component):
    a module is a candidate when it is an instance of ``module_types`` with a ``weight`` of at
    least 2 dimensions; ``include`` (if given) keeps the candidates whose name matches one of its
    globs (``fnmatch.fnmatchcase``: ``"blocks.*.mlp.*"``), ``exclude`` then removes the matching
    ones, and ``keep_first_dense`` / ``keep_last_dense`` finally drop the first / last remaining
    module in registration order (usually, but not necessarily, execution order).

    Raises:
        ValueError: an ``include`` or ``exclude`` pattern matches no candidate module, or
            nothing is left to sparsify.
    """
    return list(contract.select_layers(
        model, include=include, exclude=exclude, module_types=module_types,
        keep_first_dense=keep_first_dense, keep_last_dense=keep_last_dense,
    ))


def random_mask(
    shape: Sequence[int], n_active: int, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """A mask with exactly ``n_active`` ``True`` entries at uniformly random positions.

    The positions are drawn on the CPU from ``generator`` (so every rank seeded alike draws
    the same mask, whatever its device) and the mask is then moved to ``device``.

    Raises:
        ValueError: ``n_active`` outside [0, numel].
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    if not 0 <= n_active <= numel:
        raise ValueError(f"`n_active` must be in [0, {numel}], got {n_active}")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:n_active]] = True
    return flat.view(*shape).to(device) if device is not None else flat.view(*shape)


def _select(scores: torch.Tensor, eligible: torch.Tensor, k: int, n_eligible: int, *, largest: bool) -> torch.Tensor:
    """:func:`_select_rows` for one tensor of any shape."""
    rows = _select_rows(scores.reshape(1, -1), eligible.reshape(1, -1), k, n_eligible, largest=largest)
    return rows.view_as(eligible)


def _checked_active(mask: torch.Tensor, k: int, n_active: int | None) -> int:
    """``mask.sum()`` (counted unless given), after checking that ``k`` is in [0, it]."""
    if n_active is None:
        n_active = int(mask.sum())
    if not 0 <= k <= n_active:
        raise ValueError(f"`k` must be in [0, {n_active}] (the active count), got {k}")
    return n_active


def keep_largest(scores: torch.Tensor, mask: torch.Tensor, k: int, *, n_active: int | None = None) -> torch.Tensor:
    """The ``k`` active positions of ``mask`` with the largest ``scores``.

    Args:
        scores: any real tensor of the mask's shape (NaN counts as smallest).
        mask: bool tensor; only its ``True`` positions can be kept.
        k: how many to keep, in [0, mask.sum()].
        n_active: ``mask.sum()`` if the caller knows it (it then is not counted, which saves a
            device-to-host synchronisation); it must be exact.

    Returns:
        A new bool mask, a subset of ``mask`` with exactly ``k`` ``True`` entries; among equal
        scores the lower flat index is kept first.
    """
    return _select(scores, mask, k, _checked_active(mask, k, n_active), largest=True)


def drop_smallest(scores: torch.Tensor, mask: torch.Tensor, k: int, *, n_active: int | None = None) -> torch.Tensor:
    """The ``k`` active positions of ``mask`` with the smallest ``scores``: the ones to drop.

    The exact complement of :func:`keep_largest` within ``mask``, ties included:
    ``mask & ~drop_smallest(s, mask, k) == keep_largest(s, mask, mask.sum() - k)``.

    Args:
        scores: any real tensor of the mask's shape (NaN counts as smallest).
        mask: bool tensor; only its ``True`` positions can be dropped.
        k: how many to drop, in [0, mask.sum()].
        n_active: ``mask.sum()`` if the caller knows it (see :func:`keep_largest`); it must be exact.

    Returns:
        A new bool mask, a subset of ``mask`` with exactly ``k`` ``True`` entries; among equal
        scores the higher flat index is dropped first.
    """
    return _select(scores, mask, k, _checked_active(mask, k, n_active), largest=False)


def grow_mask(scores: torch.Tensor, kept: torch.Tensor, k: int, *, n_kept: int | None = None) -> torch.Tensor:
    """The ``k`` positions NOT in ``kept`` with the largest ``scores``.

    Args:
        scores: growth scores of the mask's shape (|dense gradient| for RigL, uniform random for SET).
        kept: bool mask of positions that may not be chosen.
        k: how many to grow, in [0, numel - kept.sum()].
        n_kept: ``kept.sum()`` if the caller knows it (see :func:`keep_largest`); it must be exact.

    Returns:
        A new bool mask, disjoint from ``kept``, with exactly ``k`` ``True`` entries; among equal
        scores the lower flat index is grown first.
    """
    if n_kept is None:
        n_kept = int(kept.sum())
    n_free = kept.numel() - n_kept
    if not 0 <= k <= n_free:
        raise ValueError(f"`k` must be in [0, {n_free}] (the free positions), got {k}")
    return _select(scores, ~kept, k, n_free, largest=True)
