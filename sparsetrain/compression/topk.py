"""Top-k selection of gradient entries by magnitude: exact, and DGC's sampled threshold.

Both selectors take a flat tensor ``x_N`` and return the int64 positions of (at most) ``k``
entries of largest ``|x|``, in no particular order. They are pure functions: the same input
gives the same positions on every rank and every run, which is what the comm hook's
bit-identical resume and its cross-rank agreement rely on.

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold;
in the CPU search: R x M the tensor read as rows (tail T), H columns or words holding a
candidate, P mask bytes (N rounded up to a multiple of 8), W int64 words of the mask.

Sampled threshold (Lin et al., "Deep Gradient Compression", ICLR 2018, Sec. 3; reference
implementation ``synxlin/deep-gradient-compression``, ``dgc/compression.py``): estimate the
k-th largest magnitude from a strided sample, take every entry at or above it, lower the
threshold by ``lower_bound`` while fewer than ``lower_bound * k`` pass (at most
``max_rounds`` rounds), and when more than ``k`` pass keep the exact top-k of the
candidates. Unlike the reference (which keeps up to 1.3k) the result never exceeds ``k``,
so every rank's message has the same fixed size and no sizes need exchanging; and the
sampled threshold aims 30% above k (DGC's upper bound, ``margin``), so that usually exactly k are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import compact

__all__ = ["num_selected", "sample_stride", "select_indices", "threshold_indices", "topk_indices"]


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
    if not 0.0 < lower_bound < 1.0:
        raise ValueError(f"`lower_bound` must be in (0, 1), got {lower_bound}")
    if max_rounds < 1:
        raise ValueError(f"`max_rounds` must be >= 1, got {max_rounds}")
    if not margin >= 1.0:
        raise ValueError(f"`margin` must be >= 1, got {margin}")
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
    q_C = words_W[hit_H].view(torch.bool).nonzero().view(-1)  # byte q of the hit words: word q // 8, byte q % 8
    return hit_H[q_C >> 3].mul_(8).add_(q_C & 7)


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
