"""Exact top-k selection under one ranking rule, shared by every component that selects by score.

**The rule.** The positions of a tensor are ranked by score, higher first; among equal scores
the lower flat (row-major) index ranks higher. This is one total order: "the ``k`` largest"
are its first ``k`` positions and "the ``k`` smallest" its last ``k``, so selecting the ``k``
smallest is exactly the complement of selecting the ``numel - k`` largest, ties included, and
every selection is a function of the scores alone: the same on every rank and every device.

**Special values.** Scores are compared as float32 (float64 for float64 scores; other dtypes
are converted to float32). NaN ranks lowest, tied with ``-inf``; infinities rank as the largest
and smallest finite value of that type (so ``+inf`` ties with ``finfo.max``, a value no real
score reaches). A caller that wants NaN to rank otherwise maps it in its scores first.

Who selects through this module:

- dynamic sparsity (:mod:`sparsetrain.sparsity.masks`): ``keep_largest``, ``drop_smallest``,
  ``grow_mask`` and, through them, RigL, SET and gradual magnitude pruning (scores ``|W|``,
  ``|grad|``, random; NaN lowest: a NaN weight is dropped first, never grown);
- N:M (:func:`sparsetrain.nm.masks.nm_mask`): the ``n`` largest of every group of ``m``, scores
  ``|W|`` with NaN mapped to ``+inf`` (a NaN weight is kept, so the NaN stays visible). Its
  elementwise rank kernels for ``m <= 16`` rank by this same rule and are tested against
  :func:`select_topk_rows`;
- gradient compression (:mod:`sparsetrain.compression.topk`): the exact selection
  (``topk_indices``, scores ``|x|``) and the final trim of the sampled-threshold selection.

**Threshold selection** (``compression.topk.threshold_indices``, approximate) relates to this
rule as follows: it takes every entry with ``|x| >= t`` for a threshold ``t`` found from a
sample, so all entries tied at ``t`` pass or fail together and NaN never passes (NaN ranks
lowest here too); when more than ``k`` pass it keeps the ``k`` of them that rank highest by this
rule. Its result is therefore, as a set, :func:`topk_positions` of ``|x|`` for some count
``C <= k``; only ``C`` is approximate. (A NaN in the sample makes the threshold NaN, and then
nothing passes.)

Shape suffixes: ``L`` rows selected independently (layers, groups), ``N`` positions of a row,
``K`` the selection size.
"""

from __future__ import annotations

import torch

__all__ = ["select_topk", "select_topk_rows", "topk_positions"]

# Up to this many entries, topk_positions ranks a CUDA tensor by one stable sort (no wait for the
# device) rather than torch.topk and a check of the ties (one wait); the crossover was measured
# with the timings recorded in benchmarks/results/compression.md (section 2).
_CUDA_SORT_MAX = 1 << 22


def select_topk(
    scores: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    eligible: torch.Tensor | None = None,
    n_eligible: int | None = None,
) -> torch.Tensor:
    """The ``k`` eligible positions of ``scores`` ranking highest (``largest``) or lowest, as a bool mask.

    Args:
        scores: real tensor of any shape.
        k: how many to select, in [0, eligible count].
        largest: select the highest-ranking positions; else the lowest-ranking.
        eligible: bool tensor of ``scores``' shape: only its ``True`` positions can be selected
            (default: all).
        n_eligible: ``eligible.sum()`` if the caller knows it (it then is not counted, which
            saves a device-to-host synchronisation); it must be exact.

    Returns:
        A new bool tensor of ``scores``' shape with exactly ``k`` ``True`` entries.

    Raises:
        ValueError: ``eligible`` of another shape or dtype, or ``k`` outside [0, eligible count].
        TypeError: ``scores`` is not a tensor.
    """
    _check_scores(scores)
    flat_eligible = None
    if eligible is not None:
        _check_eligible(eligible, scores.shape)
        flat_eligible = eligible.reshape(1, -1)
    n = _eligible_count(eligible, scores.numel(), n_eligible)
    _check_k(k, n)
    return _select_rows(scores.reshape(1, -1), flat_eligible, k, n, largest=largest).view(scores.shape)


def select_topk_rows(
    scores_LN: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    eligible_LN: torch.Tensor | None = None,
    n_eligible: int | None = None,
) -> torch.Tensor:
    """:func:`select_topk` of every row of ``scores_LN`` at once: row ``i`` of the result is
    ``select_topk(scores_LN[i], k, ...)``.

    Args:
        scores_LN: 2-D real tensor, one selection per row.
        k: how many to select in each row.
        largest: as for :func:`select_topk`.
        eligible_LN: bool tensor of ``scores_LN``'s shape (default: all eligible); every row
            must hold the same number of eligible positions.
        n_eligible: that number per row, if the caller knows it (not counted then; it must be
            exact). Without it, it is counted, and rows holding different counts are refused.

    Returns:
        A new ``[L, N]`` bool tensor with exactly ``k`` ``True`` entries per row.

    Raises:
        ValueError: ``scores_LN`` not 2-D, ``eligible_LN`` of another shape or dtype, rows with
            different eligible counts, or ``k`` outside [0, eligible count].
    """
    _check_scores(scores_LN)
    if scores_LN.dim() != 2:
        raise ValueError(f"`scores_LN` must be 2-D (rows x positions), got shape {tuple(scores_LN.shape)}")
    if eligible_LN is None:
        n = scores_LN.shape[1]
    else:
        _check_eligible(eligible_LN, scores_LN.shape)
        if n_eligible is None:
            counts = eligible_LN.sum(1).unique().tolist()
            if len(counts) > 1:
                raise ValueError(f"every row of `eligible_LN` must hold the same number of eligible positions, "
                                 f"got {counts}")
            n = int(counts[0]) if counts else 0
        else:
            n = n_eligible
    _check_k(k, n)
    return _select_rows(scores_LN, eligible_LN, k, n, largest=largest)


def topk_positions(scores_N: torch.Tensor, k: int, *, largest: bool = True, ascending: bool = True) -> torch.Tensor:
    """Flat positions of the ``k`` highest- (``largest``) or lowest-ranking entries of ``scores_N``:
    ``select_topk(scores_N, k, largest=largest).nonzero().view(-1)``, ascending (unless told not to).

    The common case costs one ``torch.topk`` of ``k + 1`` entries: where the ``k``-th and the
    ``(k+1)``-th largest scores differ, ``torch.topk``'s choice is the only one possible. Only
    where they tie (or a NaN is among them) is the whole tensor compared with the ``k``-th
    score, to take the tied positions in index order. On CUDA that check waits for the device;
    tensors of up to ``2**22`` entries are ranked by one stable sort instead, which does not (and
    at that size costs less than the wait).

    Args:
        scores_N: 1-D real tensor.
        k: how many to select, in [0, N].
        largest: as for :func:`select_topk`.
        ascending: return the positions in ascending order; else in an order that depends only
            on the scores (saves ordering them, which on the CPU costs about as much as the
            selection itself when ``N`` is close to ``k``).

    Returns:
        int64 positions, ``k`` of them.

    Raises:
        ValueError: ``scores_N`` not 1-D, or ``k`` outside [0, N].
    """
    _check_scores(scores_N)
    if scores_N.dim() != 1:
        raise ValueError(f"`scores_N` must be 1-D, got shape {tuple(scores_N.shape)}")
    n = scores_N.numel()
    _check_k(k, n)
    if k == n:
        return torch.arange(n, device=scores_N.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores_N.device)
    if not largest or not scores_N.is_floating_point():
        return _select_rows(scores_N.view(1, -1), None, k, n, largest=largest).view(-1).nonzero().view(-1)
    if scores_N.is_cuda and n <= _CUDA_SORT_MAX:
        return _top_by_sort(scores_N, k, ascending)
    vals_P, idx_P = torch.topk(scores_N, k + 1, sorted=False)  # P = K + 1 picks
    low = vals_P.min()
    kept_P = vals_P > low
    # Only the lowest pick below the rest (the k-th and (k+1)-th differ): no choice among ties,
    # unless that pick is NaN (torch.topk ranks NaN highest, the rule lowest; no comparison holds)
    # or a value that the rule ties with an infinity.
    info = torch.finfo(vals_P.dtype)
    if scores_N.is_cuda:  # one wait for the device; then the one dropped sorts last
        if bool((torch.count_nonzero(kept_P) == k) & (low > info.min) & (low < info.max)):
            return torch.sort(torch.where(kept_P, idx_P, n)).values[:k]
    elif info.min < low.item() < info.max and int(torch.count_nonzero(kept_P)) == k:
        if not ascending:
            return idx_P[kept_P]
        if n <= 32 * k:  # ascending through a mask (see _ascending)
            mask_N = torch.zeros(n, dtype=torch.bool, device=idx_P.device).index_put_((idx_P,), kept_P)
            return torch.arange(n, device=idx_P.device).masked_select(mask_N)
        return torch.sort(idx_P[kept_P]).values
    if not bool(torch.isnan(vals_P).any()):
        v_P = _rule_scores(vals_P)
        kth = torch.sort(v_P, descending=True).values[k - 1]
        info = torch.finfo(v_P.dtype)
        if info.min < kth < info.max:  # a plain value: tied positions are those equal to it
            strict_K = idx_P[v_P > kth]
            tied_T = _first_equal(scores_N, kth.to(scores_N.dtype), k - strict_K.numel())
            return _ascending(torch.cat([strict_K, tied_T]), n)
    return _select_rows(scores_N.view(1, -1), None, k, n, largest=True).view(-1).nonzero().view(-1)


def _top_by_sort(scores_N: torch.Tensor, k: int, ascending: bool) -> torch.Tensor:
    """The ``k`` highest-ranking positions through one stable descending sort of the rule's scores
    (equal scores keep their index order): nothing waits for the device."""
    top_K = torch.sort(_rule_scores(scores_N), descending=True, stable=True).indices[:k]
    return torch.sort(top_K).values if ascending else top_K


def _ascending(idx_K: torch.Tensor, n: int) -> torch.Tensor:
    """Distinct positions ``idx_K`` in ``[0, n)``, ascending: on the CPU, where ``n`` is at most 32
    times their count, through a mask of ``n`` bools (on the CPU a sort of 10k positions costs as
    much as a scan of a few million bools), else through a sort."""
    if not idx_K.is_cuda and n <= 32 * idx_K.numel():
        mask_N = torch.zeros(n, dtype=torch.bool, device=idx_K.device).index_fill_(0, idx_K, True)
        return torch.arange(n, device=idx_K.device).masked_select(mask_N)
    return torch.sort(idx_K).values


def _first_equal(scores_N: torch.Tensor, value: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the first ``count`` entries of ``scores_N`` equal to ``value`` (at least that many
    are), ascending. Read in growing chunks from the start: where ties are dense (a mostly zero
    gradient) the first chunk holds them all, and the rest of the tensor is never compared."""
    n, start, size, found, parts = scores_N.numel(), 0, max(4 * count, 1 << 16), 0, []
    while found < count and start < n:
        end = min(n, start + size)
        hit = (scores_N[start:end] == value).nonzero().view(-1).add_(start)
        parts.append(hit)
        found, start, size = found + hit.numel(), end, 2 * size
    return torch.cat(parts)[:count]


def _rule_scores(s: torch.Tensor) -> torch.Tensor:
    """``s`` as the rule compares it: float32/float64, NaN and -inf as the smallest finite value,
    +inf as the largest."""
    s = s.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    info = torch.finfo(s.dtype)
    return torch.nan_to_num(s, nan=info.min, neginf=info.min, posinf=info.max)


def _rank_select(
    scores_LN: torch.Tensor, eligible_LN: torch.Tensor | None, k: int, *, largest: bool
) -> torch.Tensor:
    """Per row, the ``k`` eligible positions ranking highest (``largest``) or lowest, as ``[L, N]`` bools.

    Rows are selected alike in one pass (one ``torch.topk`` over all rows). ``k`` must be in
    [1, eligible count] in every row (not checked: nothing here waits for the device). One
    ``torch.topk`` of size ``k`` finds each row's threshold score; every eligible score strictly
    beyond it is taken, and the places left go to the positions tied at the threshold in index
    order (a cumulative count).
    """
    s = _rule_scores(scores_LN)
    # Ineligible scores are made -inf (largest) or +inf: eligible ones are finite, so with k <= the
    # eligible count the threshold is finite and only eligible positions can reach it. (The fill is
    # a Python scalar: a tensor built on the device would be a synchronising copy.)
    if eligible_LN is not None:
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
    scores_LN: torch.Tensor, eligible_LN: torch.Tensor | None, k: int, n_eligible: int, *, largest: bool
) -> torch.Tensor:
    """Per row, the ``k`` highest- (or lowest-) ranking eligible positions, found from the smaller side.

    Every row must hold exactly ``n_eligible`` eligible positions (not checked; all ``N`` when
    ``eligible_LN`` is None). Selecting rows together gives, row for row, what selecting each
    alone gives: the selection is exact. Only ``min(k, n_eligible - k)`` scores per row go
    through ``torch.topk``: to keep 90%, the 10% left out are selected and the rest is the
    complement.
    """
    if eligible_LN is None:
        if k == 0:
            return torch.zeros(scores_LN.shape, dtype=torch.bool, device=scores_LN.device)
        if k == n_eligible:
            return torch.ones(scores_LN.shape, dtype=torch.bool, device=scores_LN.device)
    else:
        if k == 0:
            return torch.zeros_like(eligible_LN)
        if k == n_eligible:
            return eligible_LN.clone()
    if k <= n_eligible - k:
        return _rank_select(scores_LN, eligible_LN, k, largest=largest)
    # the complement of the (n_eligible - k) ranking at the other end
    other = _rank_select(scores_LN, eligible_LN, n_eligible - k, largest=not largest)
    return other.logical_not_() if eligible_LN is None else eligible_LN & ~other


def _check_scores(scores: object) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"`scores` must be real numbers, got dtype {scores.dtype}")


def _check_eligible(eligible: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(eligible, torch.Tensor) or eligible.dtype != torch.bool or eligible.shape != shape:
        got = f"{eligible.dtype} {tuple(eligible.shape)}" if isinstance(eligible, torch.Tensor) else repr(eligible)
        raise ValueError(f"`eligible` must be a bool tensor of the scores' shape {tuple(shape)}, got {got}")


def _eligible_count(eligible: torch.Tensor | None, numel: int, n_eligible: int | None) -> int:
    if n_eligible is not None:
        return n_eligible
    return numel if eligible is None else int(eligible.sum())


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"`k` must be an integer in [0, {n}] (the eligible count), got {k!r}")
