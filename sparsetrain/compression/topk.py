"""Top-k selection of gradient entries by magnitude: exact, and DGC's sampled threshold.

Both selectors take a flat tensor ``x_N`` and return the int64 positions of (at most) ``k``
entries of largest ``|x|``, in no particular order; :func:`threshold_indices_segments` gives
the sampled-threshold result for several segments of one flat tensor (a DDP bucket) at once.
They are pure functions: the same input gives the same positions on every rank and every run,
which is what the comm hook's bit-identical resume and its cross-rank agreement rely on.

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold;
in the CPU search: R x M the tensor read as rows (tail T), H columns or words holding a
candidate, P mask bytes (N rounded up to a multiple of 8), W int64 words of the mask; in
the search over several segments of one tensor (:func:`threshold_indices_segments`): G
same-sized segments searched together, H the most columns holding a candidate in any of them.

Sampled threshold (Lin et al., "Deep Gradient Compression", ICLR 2018, Sec. 3; reference
implementation ``synxlin/deep-gradient-compression``, ``dgc/compression.py``): estimate the
k-th largest magnitude from a strided sample, take every entry at or above it, lower the
threshold by ``lower_bound`` while fewer than ``lower_bound * k`` pass (at most
``max_rounds`` rounds), and when more than ``k`` pass keep the exact top-k of the
candidates. Like the reference, never more than ``k`` (it keeps the first k candidates by position, we the largest),
so every rank's message has the same fixed size and no sizes need exchanging; and the
sampled threshold aims 30% above k (DGC's upper bound, ``margin``), so that usually exactly k are kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from . import compact

__all__ = [
    "num_selected",
    "sample_stride",
    "select_indices",
    "threshold_indices",
    "threshold_indices_segments",
    "topk_indices",
]


def num_selected(numel: int, density: float) -> int:
    """Entries kept from a tensor of ``numel`` elements at ``density``: ``ceil(numel * density)``, at least 1.

    Raises:
        ValueError: ``numel`` < 1 or ``density`` outside (0, 1].
    """
    if numel < 1:
        raise ValueError(f"`numel` must be >= 1, got {numel}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")
    return max(1, min(numel, math.ceil(numel * density)))


def sample_stride(numel: int, density: float, sample_ratio: float, min_sample_hits: int = 32) -> int:
    """Stride of the threshold sample: about ``sample_ratio`` of the tensor, but enough samples
    that ``min_sample_hits`` of them are expected above the threshold (small tensors are sampled
    more densely; a stride of 1 means the whole tensor is the sample, i.e. exact selection).

    Raises:
        ValueError: an argument outside its range.
    """
    if numel < 1:
        raise ValueError(f"`numel` must be >= 1, got {numel}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"`sample_ratio` must be in (0, 1], got {sample_ratio}")
    if min_sample_hits < 1:
        raise ValueError(f"`min_sample_hits` must be >= 1, got {min_sample_hits}")
    wanted = max(math.ceil(numel * sample_ratio), math.ceil(min_sample_hits / density))
    return max(1, numel // wanted)


def topk_indices(x_N: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` entries of largest ``|x_N|`` (exact; ``torch.topk``)."""
    _check_flat(x_N, k)
    if k >= x_N.numel():
        return torch.arange(x_N.numel(), device=x_N.device)
    return torch.topk(x_N.abs(), k, sorted=False).indices


def threshold_indices(
    x_N: torch.Tensor,
    k: int,
    *,
    stride: int,
    offset: int = 0,
    lower_bound: float = 0.8,
    max_rounds: int = 10,
    margin: float = 1.3,
    scratch: torch.Tensor | None = None,
    mask_scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions of at most ``k`` large entries of ``|x_N|``, found through a sampled threshold.

    The sample is ``|x_N[offset::stride]|``; its ``ceil(margin * k * S / N)``-th largest value
    is the first threshold (aiming ``margin`` above k, so that usually at least k entries pass
    and exactly k are kept). The result is always the top-``C`` set of ``|x_N|`` for some
    ``C <= k`` (everything selected is at least as large as everything left out), with
    ``C >= lower_bound * k`` unless ``max_rounds`` ran out. ``stride == 1`` is exact top-k.

    How the entries at or above a threshold are found depends on the device, never the
    result: on CUDA one fused ``|x| >= t`` pass and ``nonzero`` (or column maxima, see
    ``_CUDA_SEARCH``); on the CPU see :func:`_cpu_search`.

    Args:
        x_N: flat tensor.
        k: how many to select, ``1 <= k <= N``.
        stride: sample stride (see :func:`sample_stride`).
        offset: first sampled position, taken modulo ``stride``; vary it per step so that
            no fixed subset of positions decides the threshold (the hook uses the step count,
            identical on every rank).
        lower_bound: lower the threshold by this factor while fewer than ``lower_bound * k``
            entries pass (DGC's 0.8).
        max_rounds: at most this many threshold tests (DGC's 10).
        margin: aim the sampled threshold at ``margin * k`` entries (>= 1; DGC: 1).
        scratch: optional float tensor of N elements that may be overwritten (saves an
            allocation of ``|x_N|`` on the CPU).
        mask_scratch: optional bool tensor of at least ``8 * ceil(N / 8)`` elements that may
            be overwritten (saves an allocation of the threshold mask on the CPU).

    Returns:
        int64 positions, ``C`` of them.
    """
    _check_flat(x_N, k)
    if stride < 1:
        raise ValueError(f"`stride` must be >= 1, got {stride}")
    _check_rounds(lower_bound, max_rounds, margin)
    n = x_N.numel()
    if stride == 1 or k >= n:
        return topk_indices(x_N, k)
    o = offset % stride
    n_sample = (n - o + stride - 1) // stride
    k_s = min(n_sample, max(1, math.ceil(margin * k * n_sample / n)))
    if x_N.is_cuda and _CUDA_SEARCH == "compact" and compact.available(x_N):
        return _compact_select(x_N, k, _kth_largest(x_N[o::stride].abs(), k_s), lower_bound, max_rounds,
                               margin)
    if x_N.is_cuda:
        threshold = _kth_largest(x_N[o::stride].abs(), k_s)
        at_least = None
        if _CUDA_SEARCH == "grouped" and margin * k / n <= _GROUPED_BELOW:
            at_least = _grouped_at_least(x_N, _GROUP_ROWS)
        if at_least is None:
            def at_least(t: torch.Tensor) -> torch.Tensor:
                return _at_least(x_N, t).nonzero().view(-1)

        def magnitudes(idx: torch.Tensor) -> torch.Tensor:
            return x_N[idx].abs()
    else:
        threshold, at_least, magnitudes = _cpu_search(x_N, stride, o, k_s, margin * k / n, scratch, mask_scratch)
    for round_ in range(max_rounds):
        idx_C = at_least(threshold)
        if idx_C.numel() >= lower_bound * k or round_ == max_rounds - 1:
            break
        threshold = threshold * lower_bound
    if idx_C.numel() > k:
        idx_C = idx_C[_largest(magnitudes(idx_C), k)]
    return idx_C


#: How the CUDA path finds the entries at or above a threshold: "compact" (two Triton passes writing
#: only the hits, see .compact; "mask" where Triton is missing), "mask" (one fused compare
#: of the whole tensor, then nonzero) or "grouped" (column maxima, then only the columns that reach
#: it: see _grouped_at_least); and, for "mask" and "grouped", how it keeps the k largest of the
#: candidates: "sort" or "topk". Every choice gives the same positions ("compact" and "sort" also
#: in the same order). On an H200 at 100M (benchmarks/gpu_topk.py) "mask" was as fast as "grouped"
#: for normal values and 14% faster for heavy-tailed ones, and "sort" 10-19% faster than "topk".
_CUDA_SEARCH = "compact"
_CUDA_FINAL = "sort"


def _compact_select(
    x_N: torch.Tensor, k: int, threshold: torch.Tensor, lower_bound: float, max_rounds: int, margin: float
) -> torch.Tensor:
    """The CUDA search through :mod:`.compact` (rounds count only): the same rounds and the same result as
    the "mask" search with the "sort" final step (positions ascending when at most k pass; else the
    k largest, by magnitude descending and equal magnitudes by position)."""
    # Both passes are queued before the count is read, so the device does not wait for the host
    # in between; the room reserved for hits is what the margin leads to expect, and in the rare
    # case that more pass, the second pass runs again with room for all.
    cap = 2 * math.ceil(margin * k) + 1024
    for round_ in range(max_rounds):
        count, starts_B = compact.count_at_least(x_N, threshold)
        keys = compact.write_hits(x_N, threshold, starts_B, cap)
        c = int(count)
        if c >= lower_bound * k or round_ == max_rounds - 1:
            break
        threshold = threshold * lower_bound
    if c > cap:
        keys = compact.write_hits(x_N, threshold, starts_B, c)
    pos_C, bits_C = compact.split(keys[:c])
    if c > k:
        return pos_C[torch.sort(bits_C, descending=True, stable=True).indices[:k]]
    return pos_C


def _largest(values_C: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest of ``values_C``; which of several equal values at the k-th place
    are kept may differ between the two methods (a stable sort keeps the earliest)."""
    if values_C.is_cuda and _CUDA_FINAL == "sort":
        return torch.sort(values_C, descending=True, stable=True).indices[:k]
    return torch.topk(values_C, k, sorted=False).indices


def select_indices(
    x_N: torch.Tensor,
    k: int,
    method: str = "topk",
    *,
    sample_ratio: float = 0.01,
    density: float | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Dispatch to :func:`topk_indices` (``method="topk"``) or :func:`threshold_indices`
    (``method="threshold"``, stride from :func:`sample_stride` at ``density``, default ``k / N``).

    Raises:
        ValueError: unknown ``method``.
    """
    if method == "topk":
        return topk_indices(x_N, k)
    if method == "threshold":
        d = density if density is not None else k / max(1, x_N.numel())
        return threshold_indices(x_N, k, stride=sample_stride(x_N.numel(), d, sample_ratio), offset=offset)
    raise ValueError(f"`method` must be 'topk' or 'threshold', got {method!r}")


def _check_rounds(lower_bound: float, max_rounds: int, margin: float) -> None:
    """The threshold search's knobs, as :func:`threshold_indices` documents them."""
    if not 0.0 < lower_bound < 1.0:
        raise ValueError(f"`lower_bound` must be in (0, 1), got {lower_bound}")
    if max_rounds < 1:
        raise ValueError(f"`max_rounds` must be >= 1, got {max_rounds}")
    if not margin >= 1.0:
        raise ValueError(f"`margin` must be >= 1, got {margin}")


def _check_flat(x_N: torch.Tensor, k: int) -> None:
    if x_N.dim() != 1:
        raise ValueError(f"`x_N` must be 1-D, got shape {tuple(x_N.shape)}")
    if not 1 <= k <= x_N.numel():
        raise ValueError(f"`k` must be in [1, {x_N.numel()}], got {k}")


#: Below this expected fraction of entries at or above the threshold, the CPU search goes through
#: column maxima (see _cpu_search); above it, through a mask of the whole tensor.
_GROUPED_BELOW = 0.005
_GROUP_ROWS = 16


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


#: How CUDA finds the sample's k-th largest: "sort" (one radix sort of the sample; 15% faster than
#: "topk" on an H100 for 1M samples) or "topk". Same value either way.
_CUDA_SAMPLE_KTH = "sort"


def _kth_largest(values_S: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``values_S`` (NaN counts as the largest, and then the result is NaN)."""
    if values_S.is_cuda and _CUDA_SAMPLE_KTH == "sort":
        # Sorting puts NaN first, so a NaN is among the k largest exactly when the first is NaN.
        desc_S = torch.sort(values_S, descending=True).values
        return torch.where(torch.isnan(desc_S[0]), desc_S[0], desc_S[k - 1])
    return torch.topk(values_S, k, sorted=False).values.min()


def _cpu_search(
    x_N: torch.Tensor,
    stride: int,
    o: int,
    k_s: int,
    fraction: float,
    scratch: torch.Tensor | None,
    mask_scratch: torch.Tensor | None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The first threshold (the ``k_s``-th largest of ``|x_N[o::stride]|``), a function
    ``t -> (x_N.abs() >= t).nonzero()`` (flat, ascending) and a function ``idx -> x_N[idx].abs()``,
    computed with few passes over ``x_N``: on the CPU each full pass costs about a nanosecond
    per element.

    Sparse (``fraction`` of the entries expected to pass, small): ``x_N`` is read as R rows
    (``R = 16``) of M columns, M a multiple of ``stride``, so that the sample is exactly the
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
    rows = _GROUP_ROWS
    m = n // (rows * stride) * stride
    if fraction <= _GROUPED_BELOW and m >= 64 and x_N.is_contiguous():
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


_fused_at_least = None


def _at_least(x_N: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``|x_N| >= threshold`` as one fused pass on CUDA (no ``|x|`` temporary), eager elsewhere."""
    global _fused_at_least
    if x_N.is_cuda and _fused_at_least is not False:
        if _fused_at_least is None:
            try:
                _fused_at_least = torch.compile(_eager_at_least, dynamic=True)
            except Exception:  # noqa: BLE001 - no compiler available: stay eager
                _fused_at_least = False
                return _eager_at_least(x_N, threshold)
        try:
            return _fused_at_least(x_N, threshold)
        except Exception:  # noqa: BLE001 - compilation failed at first call: stay eager from now on
            _fused_at_least = False
    return _eager_at_least(x_N, threshold)


def _eager_at_least(x_N: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return x_N.abs() >= threshold


# ----------------------------------------------------------------------------- many tensors at once


def threshold_indices_segments(
    x_N: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    *,
    offset: int = 0,
    lower_bound: float = 0.8,
    max_rounds: int = 10,
    margin: float = 1.3,
    scratch: torch.Tensor | None = None,
    mask_scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """:func:`threshold_indices` for several segments of one flat tensor (the tensors of a bucket).

    Gives exactly ``torch.cat([threshold_indices(x_N[s : s + n], k, stride=stride, offset=offset) + s
    for s, n, k, stride in segments])``, in the same order, but on the CPU the per-tensor steps
    are done for all segments together: the segments' thresholds come from one ``topk`` per group
    of same-sized segments (stacked, the k_s-th largest of each row), the column maxima of the
    low-density search are reduced over runs of equally spaced segments in one pass, the denser
    search compares all segments against their thresholds into one mask that is scanned once,
    and the entries in the columns that reach a threshold are gathered for a whole group at
    once. What stays per segment: the final exact top-k among the candidates (the same
    ``topk`` call on the same values as :func:`threshold_indices`, so that ties at the k-th place
    are broken alike), and the rare segment whose first threshold lets fewer than
    ``lower_bound * k`` entries pass, which repeats :func:`threshold_indices` on its own.

    Args:
        x_N: flat tensor.
        segments: ``(start, numel, k, stride)`` per segment, ascending and not overlapping.
        offset, lower_bound, max_rounds, margin: as for :func:`threshold_indices`.
        scratch: optional float tensor of N elements that may be overwritten.
        mask_scratch: optional bool tensor of at least ``8 * ceil(N / 8)`` elements that may be
            overwritten.

    Returns:
        ``(idx, counts)``: int64 positions in ``x_N``, segment after segment, and how many
        belong to each segment.

    Raises:
        ValueError: a segment outside ``x_N`` or overlapping the previous one, or an argument
            outside its range (as for :func:`threshold_indices`).
    """
    if x_N.dim() != 1:
        raise ValueError(f"`x_N` must be 1-D, got shape {tuple(x_N.shape)}")
    end = 0
    for s, n, k, stride in segments:
        if s < end or n < 1 or s + n > x_N.numel():
            raise ValueError(
                f"`segments` must be ascending, non-overlapping and inside `x_N` ({x_N.numel()} elements), "
                f"got ({s}, {n}) after end {end}"
            )
        if not 1 <= k <= n:
            raise ValueError(f"`k` must be in [1, {n}], got {k}")
        if stride < 1:
            raise ValueError(f"`stride` must be >= 1, got {stride}")
        end = s + n
    _check_rounds(lower_bound, max_rounds, margin)
    device = x_N.device
    if not segments:
        return torch.zeros(0, dtype=torch.long, device=device), []

    def one(s: int, n: int, k: int, stride: int) -> torch.Tensor:
        return threshold_indices(x_N[s : s + n], k, stride=stride, offset=offset, lower_bound=lower_bound,
                                 max_rounds=max_rounds, margin=margin).add_(s)

    if x_N.is_cuda and _CUDA_SEARCH == "compact" and x_N.dtype == torch.float32 and compact.available(x_N):
        return _compact_segments(x_N, segments, offset, lower_bound, max_rounds, margin, one)
    if x_N.is_cuda or not x_N.is_contiguous():
        parts = [one(*seg) for seg in segments]
        return torch.cat(parts), [p.numel() for p in parts]

    # Which search each segment takes (the same choice as _cpu_search), grouped by size.
    rows = _GROUP_ROWS
    grouped: dict[tuple[int, int, int], list[int]] = {}
    masked: dict[tuple[int, int, int], list[int]] = {}
    found: list[torch.Tensor | None] = [None] * len(segments)  # candidates, ascending
    for i, (s, n, k, stride) in enumerate(segments):
        if stride == 1 or k >= n:
            found[i] = topk_indices(x_N[s : s + n], k).add_(s)  # final: exact
            continue
        if margin * k / n <= _GROUPED_BELOW and n // (rows * stride) * stride >= 64:
            grouped.setdefault((n, k, stride), []).append(i)
        else:
            masked.setdefault((n, k, stride), []).append(i)
    final = [f is not None for f in found]

    mags: list[torch.Tensor | None] = [None] * len(segments)
    for (n, k, stride), members in grouped.items():
        starts = [segments[i][0] for i in members]
        pos_C, mag_C, counts = _grouped_segments(x_N, starts, n, k, stride, offset % stride, margin)
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
            found[i] = found[i].index_select(0, _largest(mags[i], k))
    return torch.cat(found), [f.numel() for f in found]


class _SegmentPlan:
    """What the CUDA search over a bucket's segments reuses from step to step (see
    :func:`_compact_segments`): the sample's positions for offset 0 (each segment's sample
    at ``start + j * stride``, at most ``ceil(numel / stride)`` of them), and the blocks of the
    counting and writing passes."""

    def __init__(self, segments: tuple[tuple[int, int, int, int], ...], device: torch.device) -> None:
        start_G, numel_G, _k, stride_G = (torch.tensor(c, dtype=torch.int64, device=device) for c in zip(*segments))
        size_G = (numel_G + stride_G - 1) // stride_G
        first = [0]
        for _s, n, _k, stride in segments[:-1]:
            first.append(first[-1] + -(-n // stride))
        self.first_G = first  # where each segment's sample begins, in the sample
        self.first_dev = torch.tensor(first, dtype=torch.int64, device=device)
        self.arange_G = torch.arange(len(segments), device=device)
        self.seg_P = self.arange_G.repeat_interleave(size_G)
        j_P = torch.arange(self.seg_P.numel(), device=device) - self.first_dev.index_select(0, self.seg_P)
        self.base_P = start_G.index_select(0, self.seg_P) + j_P * stride_G.index_select(0, self.seg_P)
        self.end_P = (start_G + numel_G).index_select(0, self.seg_P)
        self.table_B3, self.last_G = compact.block_table([(s, n) for s, n, _k, _st in segments], device)


_SEGMENT_PLANS: dict[tuple, _SegmentPlan] = {}
_LOW32 = (1 << 32) - 1
_INF_BITS = 0x7F800000


def _to_device(values: list[list[int]], device: torch.device) -> torch.Tensor:
    """A small int64 table copied to ``device`` without waiting for the device (pinned source)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _compact_segments(
    x_N: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    offset: int,
    lower_bound: float,
    max_rounds: int,
    margin: float,
    one: Callable[[int, int, int, int], torch.Tensor],
) -> tuple[torch.Tensor, list[int]]:
    """The CUDA search of :func:`threshold_indices_segments`: every segment's first round at once,
    waiting for the device once per call instead of once per segment.

    Per segment the result is that of :func:`threshold_indices` (the "compact" search): the same
    sample and sampled threshold, the same hits, and the same final order. The thresholds come
    from one sort of all samples keyed by (segment, magnitude bits descending); the hits of all
    segments from one counting and one writing pass (:func:`compact.count_segments`); the k
    largest of each segment that has more than k from one stable sort keyed the same way. A
    segment whose first threshold lets fewer than ``lower_bound * k`` pass, and one selected
    exactly (stride 1 or k >= numel), is done on its own by ``one``.
    """
    searched = [g for g, (_s, n, k, stride) in enumerate(segments) if stride > 1 and k < n]
    parts: list[torch.Tensor | None] = [None] * len(segments)
    if searched:
        idx_K, kept, redo = _search_segments(x_N, [segments[g] for g in searched], offset, lower_bound,
                                             max_rounds, margin)
        if len(searched) == len(segments) and not any(redo):
            return idx_K, kept
        for g, part, again in zip(searched, idx_K.split(kept), redo):
            parts[g] = None if again else part
    for g, seg in enumerate(segments):
        if parts[g] is None:
            parts[g] = one(*seg)
    return torch.cat(parts), [p.numel() for p in parts]


def _search_segments(
    x_N: torch.Tensor,
    segments: list[tuple[int, int, int, int]],
    offset: int,
    lower_bound: float,
    max_rounds: int,
    margin: float,
) -> tuple[torch.Tensor, list[int], list[bool]]:
    """The batched part of :func:`_compact_segments` (segments with ``stride > 1`` and ``k < numel``):
    ``(positions, counts, redo)``, where ``redo`` marks the segments that need more than their first
    round; those have no positions here."""
    device = x_N.device
    key = (tuple(segments), device)
    plan = _SEGMENT_PLANS.get(key)
    if plan is None:
        if len(_SEGMENT_PLANS) >= 64:
            _SEGMENT_PLANS.clear()
        plan = _SEGMENT_PLANS[key] = _SegmentPlan(key[0], device)
    o_G, kth_G, cap = [], [], 0
    for g, (_s, n, k, stride) in enumerate(segments):
        o = offset % stride
        n_sample = (n - o + stride - 1) // stride
        o_G.append(o)
        kth_G.append(plan.first_G[g] + min(n_sample, max(1, math.ceil(margin * k * n_sample / n))) - 1)
        cap += 2 * math.ceil(margin * k) + 1024
    o_G, kth_G = _to_device([o_G, kth_G], device).unbind(0)

    # Thresholds: the k_s-th largest sampled magnitude of each segment; NaN where a sample holds NaN.
    pos_P = plan.base_P + o_G.index_select(0, plan.seg_P)
    inside_P = pos_P < plan.end_P
    bits_P = x_N.index_select(0, torch.where(inside_P, pos_P, 0)).abs_().view(torch.int32).long()
    bits_P = torch.where(inside_P, bits_P, 0)  # past a segment's end: sorts as 0.0, after every real entry
    keys_P = torch.sort((plan.seg_P << 32) | (_LOW32 - bits_P)).values
    first_bits = _LOW32 - (keys_P.index_select(0, plan.first_dev) & _LOW32)
    kth_bits = _LOW32 - (keys_P.index_select(0, kth_G) & _LOW32)
    thr_G = torch.where(first_bits > _INF_BITS, first_bits, kth_bits).int().view(torch.float32)

    counts_G, starts_B = compact.count_segments(x_N, thr_G, plan.table_B3, plan.last_G)
    keys_C = compact.write_segments(x_N, thr_G, plan.table_B3, starts_B, cap)
    counts = counts_G.tolist()  # the one wait for the device
    total = sum(counts)
    if total > cap:
        keys_C = compact.write_segments(x_N, thr_G, plan.table_B3, starts_B, total)
    pos_C, bits_C = compact.split(keys_C[:total])

    ks = [k for _s, _n, k, _st in segments]
    redo = [c < lower_bound * k and max_rounds > 1 for c, k in zip(counts, ks)]
    trim = [not r and c > k for c, k, r in zip(counts, ks, redo)]
    kept = [0 if r else min(c, k) for c, k, r in zip(counts, ks, redo)]
    n_kept = sum(kept)
    # Output entry j of segment g comes from hit j of g (or from g's j-th largest, where g is trimmed).
    shift = [(e - c) - (f - m) for e, c, f, m in
             zip(itertools.accumulate(counts), counts, itertools.accumulate(kept), kept)]
    shift_G, kept_G, trim_G = _to_device([shift, kept, trim], device).unbind(0)
    seg_K = plan.arange_G.repeat_interleave(kept_G, output_size=n_kept)
    src_K = torch.arange(n_kept, device=device) + shift_G.index_select(0, seg_K)
    idx_K = pos_C.index_select(0, src_K)
    if any(trim):  # by magnitude descending, equal magnitudes in position order (a stable sort)
        seg_C = plan.arange_G.repeat_interleave(counts_G, output_size=total)
        order_C = torch.sort((seg_C << 32) | (_LOW32 - bits_C.long()), stable=True).indices
        ranked_K = pos_C.index_select(0, order_C.index_select(0, src_K))
        idx_K = torch.where(trim_G.index_select(0, seg_K).bool(), ranked_K, idx_K)
    return idx_K, kept, redo


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
    x_N: torch.Tensor, starts: list[int], n: int, k: int, stride: int, o: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The column-maxima search of :func:`_cpu_search` for G segments of the same size at once.

    Returns:
        The entries at or above each segment's first threshold (flat positions in ``x_N``,
        segment after segment, ascending within each), their magnitudes, and how many each
        segment has.
    """
    rows = _GROUP_ROWS
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
