"""The CUDA search of the sampled-threshold selection (:mod:`.topk`).

Which search runs is chosen by :class:`.topk.TopkTuning` (``cuda_search``): ``"compact"`` (two
Triton passes writing only the hits, :mod:`.compact`; :func:`_compact_select`, and for all
segments of a bucket at once :func:`_compact_segments`), ``"mask"`` (one fused ``|x| >= t`` pass
and ``nonzero``) or ``"grouped"`` (column maxima, then only the columns that reach the
threshold: :func:`._topk_cpu._grouped_at_least`). Every choice gives the same positions, and
the CPU search's too; ``"compact"`` and the ``"sort"`` final step also give the same order.
Measured speeds of the options: ``benchmarks/gpu_topk.py`` and ``benchmarks/RESULTS.md``.

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold;
G segments, P sample entries of all segments, B blocks of the counting and writing passes,
K selected entries of all segments.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from . import _topk_cpu, compact


def _kth_largest(values_S: torch.Tensor, k: int, *, by_sort: bool) -> torch.Tensor:
    """The ``k``-th largest of ``values_S`` (NaN counts as the largest, and then the result is NaN):
    through one radix sort of the sample (``by_sort``) or ``torch.topk``; the same value either way."""
    if values_S.is_cuda and by_sort:
        # Sorting puts NaN first, so a NaN is among the k largest exactly when the first is NaN.
        desc_S = torch.sort(values_S, descending=True).values
        return torch.where(torch.isnan(desc_S[0]), desc_S[0], desc_S[k - 1])
    return _topk_cpu._kth_largest(values_S, k)


def _largest(values_C: torch.Tensor, k: int, *, by_sort: bool) -> torch.Tensor:
    """Positions of the ``k`` largest of ``values_C`` (candidates' magnitudes, no NaN): through a
    stable sort (``by_sort``; equal values by position, the rule of :mod:`sparsetrain.selection`)
    or ``torch.topk`` (which may keep other ones of several equal values at the k-th place)."""
    if by_sort:
        return torch.sort(values_C, descending=True, stable=True).indices[:k]
    return torch.topk(values_C, k, sorted=False).indices


def _mask_search(
    x_N: torch.Tensor, o: int, stride: int, k_s: int, fraction: float, *, grouped: bool, by_sort: bool,
    fused: bool, rows: int, grouped_below: float,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The ``"mask"`` and ``"grouped"`` searches: the first threshold (the ``k_s``-th largest of
    ``|x_N[o::stride]|``), a function ``t -> (x_N.abs() >= t).nonzero()`` (flat, ascending) and a
    function ``idx -> x_N[idx].abs()``. The column maxima are used (``grouped``) only where the
    fraction of the entries expected to pass (``fraction``) is at most ``grouped_below``."""
    threshold = _kth_largest(x_N[o::stride].abs(), k_s, by_sort=by_sort)
    at_least = None
    if grouped and fraction <= grouped_below:
        at_least = _topk_cpu._grouped_at_least(x_N, rows)
    if at_least is None:
        def at_least(t: torch.Tensor) -> torch.Tensor:
            return _at_least(x_N, t, fused=fused).nonzero().view(-1)

    def magnitudes(idx: torch.Tensor) -> torch.Tensor:
        return x_N[idx].abs()

    return threshold, at_least, magnitudes


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


_fused_at_least = None


def _at_least(x_N: torch.Tensor, threshold: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """``|x_N| >= threshold`` as one fused pass on CUDA (no ``|x|`` temporary; ``fused``, where
    ``torch.compile`` works), eager elsewhere."""
    global _fused_at_least
    if fused and x_N.is_cuda and _fused_at_least is not False:
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
    """The CUDA search of :func:`.topk.threshold_indices_segments`: every segment's first round at once,
    waiting for the device once per call instead of once per segment.

    Per segment the result is that of :func:`.topk.threshold_indices` (the "compact" search): the same
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
