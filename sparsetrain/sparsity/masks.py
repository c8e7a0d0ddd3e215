"""Which weights get a mask, and the exact-count mask primitives the methods are built from.

Everything here is a pure function: it reads tensors or a module tree and returns new
tensors or names; nothing registers buffers or hooks (that is :mod:`.dynamic`).

Masks are ``torch.bool`` tensors of the weight's shape; ``True`` marks an active weight.
Selections are exact and fully determined by the scores: positions are ranked by score,
and among equal scores the lower flat (row-major) index ranks higher; a selection of ``k``
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


def _rank_select(scores_LN: torch.Tensor, eligible_LN: torch.Tensor, k: int, *, largest: bool) -> torch.Tensor:
    """Per row, the ``k`` eligible positions ranking highest (``largest``) or lowest, as ``[L, N]`` bools.

    Rows are independent layers (``L``) of ``N`` flattened positions each, selected alike in one
    pass (one ``torch.topk`` over all rows). Ranks follow the order of the module docstring. ``k``
    must be in [1, eligible count] in every row (not checked: nothing here waits for the device).
    One ``torch.topk`` of size ``k`` finds each row's threshold score; every eligible score strictly
    beyond it is taken, and the places left go to the positions tied at the threshold in index order
    (a cumulative count).
    """
    s = scores_LN.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    # Eligible scores are made finite (NaN and -inf lowest), the others -inf (largest) or +inf:
    # with k <= the eligible count the threshold is finite, so only eligible positions can reach it.
    # (The fill is a Python scalar: a tensor built on the device would be a synchronising copy.)
    info = torch.finfo(s.dtype)
    s = torch.nan_to_num(s, nan=info.min, neginf=info.min, posinf=info.max)
    s = torch.where(eligible_LN, s, float("-inf") if largest else float("inf"))
    picked_LK = torch.topk(s, k, dim=1, largest=largest, sorted=False).values
    one = s.shape[0] == 1  # one row: whole-tensor reductions (on the CPU twice as fast as per-row ones)
    if one:
        kth_L1 = picked_LK.min() if largest else picked_LK.max()
    else:
        kth_L1 = picked_LK.amin(dim=1, keepdim=True) if largest else picked_LK.amax(dim=1, keepdim=True)
    chosen = s > kth_L1 if largest else s < kth_L1
    tie = s == kth_L1
    # >= 1 places left in each row for the tied positions
    need_L1 = k - (torch.count_nonzero(chosen) if one else torch.count_nonzero(chosen, dim=1).unsqueeze(1))
    count = tie.cumsum(1, dtype=torch.int32 if tie.shape[1] < 2**31 else torch.int64)
    # Among ties the lower index ranks higher: taking the highest picks the first `need` of them,
    # taking the lowest picks the last `need`.
    take = count <= need_L1 if largest else count > count[:, -1:] - need_L1
    return chosen | (tie & take)


def _select_rows(
    scores_LN: torch.Tensor, eligible_LN: torch.Tensor, k: int, n_eligible: int, *, largest: bool
) -> torch.Tensor:
    """Per row, the ``k`` highest- (or lowest-) ranking eligible positions, found from the smaller side.

    Every row must hold exactly ``n_eligible`` eligible positions (not checked). Selecting rows
    together gives, row for row, what selecting each alone gives: the selection is exact.
    """
    if k == 0:
        return torch.zeros_like(eligible_LN)
    if k == n_eligible:
        return eligible_LN.clone()
    if k <= n_eligible - k:
        return _rank_select(scores_LN, eligible_LN, k, largest=largest)
    # the complement of the (n_eligible - k) ranking at the other end
    return eligible_LN & ~_rank_select(scores_LN, eligible_LN, n_eligible - k, largest=not largest)


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
