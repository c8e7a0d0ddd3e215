"""The CPU search of the sampled-threshold selection (:mod:`.topk`): the entries of a flat tensor at
or above a threshold, found with few passes over it (each full pass costs about a nanosecond per
element), for one tensor (:func:`_cpu_search`) or for all segments of a bucket together
(:func:`_cpu_segments`). Every function gives exactly the plain computation's result (``|x| >= t``
and ``nonzero``), in the same order. The column-maxima search (:func:`_grouped_at_least`) also
serves the CUDA ``"grouped"`` option, and :func:`_kth_largest` the CUDA ``"topk"`` option.

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold;
R x M the tensor read as rows (tail T), H columns or words holding a candidate, P mask bytes
(N rounded up to a multiple of 8), W int64 words of the mask; in the search over several
segments of one tensor: G same-sized segments searched together, H the most columns holding a
candidate in any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..selection import topk_positions


def _kth_largest(values_S: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``values_S`` (NaN counts as the largest, and then the result is NaN)."""
    return torch.topk(values_S, k, sorted=False).values.min()


def _grouped_at_least(
    x_N: torch.Tensor,
    rows: int,
    *,
    x_RM: torch.Tensor | None = None,
    max_M: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function ``t -> (x_N.abs() >= t).nonzero()`` (flat, ascending) that reads ``x_N`` once.

    ``x_N`` is read as R rows (``R = rows``) of M columns plus a tail; one pass gives each
    column's largest magnitude ``max_M`` (computed here unless given), and for a threshold only
    the columns whose maximum reaches it are gathered and compared entry by entry. A NaN makes
    its column's maximum NaN, and such a column is always gathered. Returns None when ``x_N`` is
    too small or not contiguous for the grouping to pay.
    """
    n = x_N.numel()
    if x_RM is None:
        m = n // rows
        if m < 64 or not x_N.is_contiguous():
            return None
        x_RM = x_N[: rows * m].view(rows, m)
    m = x_RM.shape[1]
    if max_M is None:
        max_M = torch.maximum(x_RM.amax(0), x_RM.amin(0).neg_())
    tail_T = x_N[rows * m :]

    def grouped(t: torch.Tensor) -> torch.Tensor:
        hit_H = torch.lt(max_M, t).logical_not_().nonzero().view(-1)  # NaN maxima count as hits
        h = hit_H.numel()
        parts = []
        if h:
            ok_RH = torch.ge(x_RM.index_select(1, hit_H).abs_(), t)
            q_C = ok_RH.view(-1).nonzero().view(-1)  # row-major: row q // h, hit column q % h
            parts.append(torch.div(q_C, h, rounding_mode="floor").mul_(m).add_(hit_H[q_C % h]))
        if tail_T.numel():
            parts.append((tail_T.abs() >= t).nonzero().view(-1).add_(rows * m))
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=x_N.device)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    return grouped


def _cpu_search(
    x_N: torch.Tensor,
    stride: int,
    o: int,
    k_s: int,
    fraction: float,
    scratch: torch.Tensor | None,
    mask_scratch: torch.Tensor | None,
    *,
    rows: int,
    grouped_below: float,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The first threshold (the ``k_s``-th largest of ``|x_N[o::stride]|``), a function
    ``t -> (x_N.abs() >= t).nonzero()`` (flat, ascending) and a function ``idx -> x_N[idx].abs()``,
    computed with few passes over ``x_N``: on the CPU each full pass costs about a nanosecond
    per element.

    Sparse (``fraction`` of the entries expected to pass, at most ``grouped_below``): ``x_N`` is
    read as R rows (``R = rows``) of M columns, M a multiple of ``stride``, so that the sample is exactly the
    columns ``o, o + stride, ...`` (and part of the tail). One ``amax``/``amin`` pass over the
    rows gives each column's largest magnitude. Threshold: it is the ``k_s``-th largest entry of
    the ``k_s`` sampled columns with the largest maxima (were a sampled entry at or above it in
    another column, each of those ``k_s`` columns would hold an entry at least as large).
    Search: only the columns whose maximum reaches ``t`` are gathered and compared entry by
    entry. A NaN makes its column's maximum NaN, which ``topk`` ranks first and the search
    always gathers, so NaNs reach the threshold and the comparisons as in the plain computation.

    Denser: ``|x_N|`` and the mask ``|x| >= t`` are written once per threshold and the mask
    is scanned by :func:`_true_positions`.

    Both give exactly the plain computation's threshold and positions, in the same order.
    """
    n = x_N.numel()
    m = n // (rows * stride) * stride
    if fraction <= grouped_below and m >= 64 and x_N.is_contiguous():
        x_RM = x_N[: rows * m].view(rows, m)
        max_M = torch.maximum(x_RM.amax(0), x_RM.amin(0).neg_())
        cols_max = max_M[o::stride]  # rows * m is a multiple of stride: these columns are the sample
        if rows * m == n and cols_max.numel() >= k_s:
            top = torch.topk(cols_max, k_s, sorted=False).indices.mul_(stride).add_(o)
            threshold = _kth_largest(x_RM.index_select(1, top).abs_().view(-1), k_s)
        else:  # the tail holds sampled entries too (rare for weight shapes): sample the plain way
            threshold = _kth_largest(x_N[o::stride].abs(), k_s)

        grouped = _grouped_at_least(x_N, rows, x_RM=x_RM, max_M=max_M)

        def gathered(idx: torch.Tensor) -> torch.Tensor:
            return x_N[idx].abs()

        return threshold, grouped, gathered

    threshold = _kth_largest(x_N[o::stride].abs(), k_s)
    mag_N = torch.abs(x_N, out=scratch) if scratch is not None and scratch.numel() == n else x_N.abs()
    p = -(-n // 8) * 8
    usable = (mask_scratch is not None and mask_scratch.dtype == torch.bool and mask_scratch.numel() >= p
              and mask_scratch.is_contiguous() and mask_scratch.device == x_N.device)
    mask_P = mask_scratch[:p] if usable else torch.empty(p, dtype=torch.bool, device=x_N.device)
    mask_P[n:].fill_(False)

    def masked(t: torch.Tensor) -> torch.Tensor:
        torch.ge(mag_N, t, out=mask_P[:n])
        return _true_positions(mask_P)

    def from_mag(idx: torch.Tensor) -> torch.Tensor:
        return mag_N[idx]

    return threshold, masked, from_mag


def _true_positions(mask_P: torch.Tensor) -> torch.Tensor:
    """``mask_P.nonzero()`` as a flat int64 tensor (ascending), for a sparse CPU mask.

    ``torch.nonzero`` reads a bool mask one byte at a time, which dominated the CPU selection
    (about 3 ns per element). Read as int64 words (``P`` a multiple of 8), the mask has 8 times
    fewer entries to scan; then only the bytes of the words holding a True are scanned. When
    more than half of the words hold one (the dense steps of the ramp), the plain scan is used.
    Either way the result is the same tensor.
    """
    p = mask_P.numel()
    if p % 8 or mask_P.storage_offset() % 8 or not mask_P.is_contiguous():
        return mask_P.nonzero().view(-1)
    words_W = mask_P.view(torch.int64)
    hit_H = words_W.nonzero().view(-1)
    if 2 * hit_H.numel() > words_W.numel():
        return mask_P.nonzero().view(-1)
    # byte q of the hit words: word q // 8, byte q % 8 (index_select: a cheaper gather than indexing)
    q_C = words_W.index_select(0, hit_H).view(torch.bool).nonzero().view(-1)
    return hit_H.index_select(0, q_C >> 3).mul_(8).add_(q_C & 7)


# ----------------------------------------------------------------------------- many segments at once


def _cpu_segments(
    x_N: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    offset: int,
    lower_bound: float,
    max_rounds: int,
    margin: float,
    scratch: torch.Tensor | None,
    mask_scratch: torch.Tensor | None,
    one: Callable[[int, int, int, int], torch.Tensor],
    *,
    rows: int,
    grouped_below: float,
) -> tuple[torch.Tensor, list[int]]:
    """The CPU search of :func:`.topk.threshold_indices_segments` on a contiguous ``x_N``: the
    per-tensor steps done for all segments together (see there). ``one(start, numel, k, stride)``
    selects one segment on its own (for a segment whose first threshold lets too few pass)."""
    # Which search each segment takes (the same choice as _cpu_search), grouped by size.
    grouped: dict[tuple[int, int, int], list[int]] = {}
    masked: dict[tuple[int, int, int], list[int]] = {}
    found: list[torch.Tensor | None] = [None] * len(segments)  # candidates, ascending
    for i, (s, n, k, stride) in enumerate(segments):
        if stride == 1 or k >= n:
            found[i] = topk_positions(x_N[s : s + n].abs(), k).add_(s)  # final: exact
            continue
        if margin * k / n <= grouped_below and n // (rows * stride) * stride >= 64:
            grouped.setdefault((n, k, stride), []).append(i)
        else:
            masked.setdefault((n, k, stride), []).append(i)
    final = [f is not None for f in found]

    mags: list[torch.Tensor | None] = [None] * len(segments)
    for (n, k, stride), members in grouped.items():
        starts = [segments[i][0] for i in members]
        pos_C, mag_C, counts = _grouped_segments(x_N, starts, n, k, stride, offset % stride, margin, rows)
        for i, pos, mag in zip(members, pos_C.split(counts), mag_C.split(counts)):
            found[i], mags[i] = pos, mag
    if masked:
        _masked_segments(x_N, segments, masked, found, mags, offset, margin, scratch, mask_scratch)

    for i, (s, n, k, stride) in enumerate(segments):
        if final[i]:
            continue
        c = found[i].numel()
        if c < lower_bound * k and max_rounds > 1:
            found[i] = one(s, n, k, stride)  # lower the threshold: this segment on its own
        elif c > k:
            found[i] = found[i].index_select(0, topk_positions(mags[i], k, ascending=False))
    return torch.cat(found), [f.numel() for f in found]


def _blocks(starts: list[int]) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Cover ascending ``starts`` by blocks of equally spaced segments, each readable as one strided
    view: ``(first index, lengths, spacings)``, one level (``(L,)``) or two (``(L1, L2)``: L1
    equally spaced runs of L2 equally spaced segments, e.g. the same weight of every layer)."""
    def run(i: int) -> tuple[int, int]:  # length and spacing of the run of equal spacing from i
        if i + 1 >= len(starts):
            return 1, 0
        step, j = starts[i + 1] - starts[i], i + 2
        while j < len(starts) and starts[j] - starts[j - 1] == step:
            j += 1
        return j - i, step

    out, i = [], 0
    while i < len(starts):
        length, step = run(i)
        chunks, outer = 1, 0
        if length > 1:
            j = i + length
            while j + length <= len(starts) and run(j)[0] >= length and starts[j + 1] - starts[j] == step:
                if chunks == 1:
                    outer = starts[j] - starts[i]
                elif starts[j] - starts[j - length] != outer:
                    break
                chunks, j = chunks + 1, j + length
        if chunks > 1:
            out.append((i, (chunks, length), (outer, step)))
        else:
            out.append((i, (length,), (step,)))
        i += chunks * length
    return out


def _stacked(t: torch.Tensor, starts: list[int], block: tuple[int, tuple[int, ...], tuple[int, ...]],
             shape: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """The segments of one block of :func:`_blocks` as a view of ``t``: lengths + ``shape``."""
    first, lengths, spacings = block
    return t.as_strided(lengths + shape, spacings + strides, t.storage_offset() + starts[first])


def _grouped_segments(
    x_N: torch.Tensor, starts: list[int], n: int, k: int, stride: int, o: int, margin: float, rows: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The column-maxima search of :func:`_cpu_search` for G segments of the same size at once.

    Returns:
        The entries at or above each segment's first threshold (flat positions in ``x_N``,
        segment after segment, ascending within each), their magnitudes, and how many each
        segment has.
    """
    m = n // (rows * stride) * stride
    t = n - rows * m  # tail
    g = len(starts)
    n_sample = (n - o + stride - 1) // stride
    k_s = min(n_sample, max(1, math.ceil(margin * k * n_sample / n)))
    device = x_N.device
    # column maxima of |x| (G x M), one amax and one amin per block of equally spaced segments
    hi_GM = torch.empty(g, m, dtype=x_N.dtype, device=device)
    lo_GM = torch.empty(g, m, dtype=x_N.dtype, device=device)
    for block in _blocks(starts):
        first, lengths, _ = block
        x_RM = _stacked(x_N, starts, block, (rows, m), (m, 1))
        out = slice(first, first + math.prod(lengths))
        torch.amax(x_RM, -2, out=hi_GM[out].view(*lengths, m))
        torch.amin(x_RM, -2, out=lo_GM[out].view(*lengths, m))
    max_GM = torch.maximum(hi_GM, lo_GM.neg_())
    start_G = torch.tensor(starts, dtype=torch.long, device=device)
    row_R = torch.arange(0, rows * m, m, device=device)
    if t == 0 and m // stride >= k_s:
        # threshold: the k_s-th largest entry of the k_s sampled columns with the largest maxima
        top_GS = torch.topk(max_GM[:, o::stride], k_s, dim=1, sorted=False).indices.mul_(stride)
        sample_idx = (top_GS.add_(start_G[:, None] + o)[:, None, :] + row_R[None, :, None]).view(-1)
    else:  # the tail holds sampled entries too: sample the plain way
        sample_idx = (start_G[:, None] + torch.arange(o, n, stride, device=device)).view(-1)
    sample_GS = x_N.index_select(0, sample_idx).abs_().view(g, -1)
    threshold_G = torch.topk(sample_GS, k_s, dim=1, sorted=False).values.amin(1)
    # search: the columns whose maximum reaches the threshold (NaN maxima count), at most H per
    # segment, gathered into G x R x H so that the entries come out per segment, row by row
    hit_P = torch.empty(-(-g * m // 8) * 8, dtype=torch.bool, device=device)
    hit_P[g * m :].fill_(False)
    torch.lt(max_GM, threshold_G[:, None], out=hit_P[: g * m].view(g, m)).logical_not_()
    q_H = _true_positions(hit_P)  # segment q // m, column q % m
    seg_H = torch.div(q_H, m, rounding_mode="floor")
    per_G = torch.bincount(seg_H, minlength=g)
    h = int(per_G.max())
    slot_H = torch.arange(q_H.numel(), device=device).sub_((per_G.cumsum(0) - per_G)[seg_H])
    col_GH = torch.zeros(g, h, dtype=torch.long, device=device)  # padding: position 0, masked out below
    col_GH[seg_H, slot_H] = q_H.add_((start_G - m * torch.arange(g, device=device))[seg_H])
    real_GH = torch.zeros(g, h, dtype=torch.bool, device=device)
    real_GH[seg_H, slot_H] = True
    # then the tail: G x (R * H + T) candidates, row by row, the tail last
    pos_GC = (col_GH[:, None, :] + row_R[None, :, None]).view(g, rows * h)
    if t:
        pos_GC = torch.cat([pos_GC, start_G[:, None] + torch.arange(rows * m, n, device=device)], 1)
    c = pos_GC.shape[1]
    mag_GC = x_N.index_select(0, pos_GC.view(-1)).abs_().view(g, c)
    ok_P = torch.empty(-(-g * c // 8) * 8, dtype=torch.bool, device=device)
    ok_P[g * c :].fill_(False)
    ok_GC = torch.ge(mag_GC, threshold_G[:, None], out=ok_P[: g * c].view(g, c))
    ok_GC[:, : rows * h].view(g, rows, h).logical_and_(real_GH[:, None, :])
    q_C = _true_positions(ok_P)
    return pos_GC.view(-1).index_select(0, q_C), mag_GC.view(-1).index_select(0, q_C), ok_GC.sum(1).tolist()


def _masked_segments(
    x_N: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    masked: dict[tuple[int, int, int], list[int]],
    found: list[torch.Tensor | None],
    mags: list[torch.Tensor | None],
    offset: int,
    margin: float,
    scratch: torch.Tensor | None,
    mask_scratch: torch.Tensor | None,
) -> None:
    """The mask search of :func:`_cpu_search` for all ``masked`` segments at once: ``|x|`` once, each
    group of same-sized segments compared with its thresholds into one mask, the mask scanned
    once. Writes each segment's entries at or above its first threshold (flat positions,
    ascending) and their magnitudes into ``found`` and ``mags``."""
    device = x_N.device
    members = sorted(i for group in masked.values() for i in group)
    lo = segments[members[0]][0]
    hi = segments[members[-1]][0] + segments[members[-1]][1]
    usable = scratch is not None and scratch.numel() == x_N.numel() and scratch.dtype == x_N.dtype
    mag_N = torch.abs(x_N[lo:hi], out=scratch[lo:hi]) if usable else x_N[lo:hi].abs()
    p = -(-(hi - lo) // 8) * 8
    usable = (mask_scratch is not None and mask_scratch.dtype == torch.bool and mask_scratch.numel() >= p
              and mask_scratch.is_contiguous() and mask_scratch.device == device)
    mask_P = mask_scratch[:p] if usable else torch.empty(p, dtype=torch.bool, device=device)
    mask_P.fill_(False)
    for (n, k, stride), group in masked.items():
        starts = [segments[i][0] - lo for i in group]
        o = offset % stride
        n_sample = (n - o + stride - 1) // stride
        k_s = min(n_sample, max(1, math.ceil(margin * k * n_sample / n)))
        start_G = torch.tensor(starts, dtype=torch.long, device=device)
        sample_GS = mag_N.index_select(0, (start_G[:, None] + torch.arange(o, n, stride, device=device)).view(-1))
        threshold_G = torch.topk(sample_GS.view(len(group), -1), k_s, dim=1, sorted=False).values.amin(1)
        for block in _blocks(starts):
            first, lengths, _ = block
            t = threshold_G[first : first + math.prod(lengths)].view(*lengths, 1)
            torch.ge(_stacked(mag_N, starts, block, (n,), (1,)), t, out=_stacked(mask_P, starts, block, (n,), (1,)))
    q_C = _true_positions(mask_P)
    pos_C = q_C + lo
    mag_C = mag_N.index_select(0, q_C)
    bounds = torch.tensor([b for i in members for b in (segments[i][0], segments[i][0] + segments[i][1])],
                          dtype=torch.long, device=device)
    edges = torch.searchsorted(pos_C, bounds).tolist()
    for j, i in enumerate(members):
        found[i] = pos_C[edges[2 * j] : edges[2 * j + 1]]
        mags[i] = mag_C[edges[2 * j] : edges[2 * j + 1]]
