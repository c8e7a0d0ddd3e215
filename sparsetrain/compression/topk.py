"""Top-k selection of gradient entries by magnitude: exact, and DGC's sampled threshold.

Both selectors take a flat tensor ``x_N`` and return the int64 positions of (at most) ``k``
entries of largest ``|x|``; :func:`threshold_indices_segments` gives the sampled-threshold
result for several segments of one flat tensor (a DDP bucket) at once. They are pure
functions: the same input gives the same positions on every rank and every run, which is what
the comm hook's bit-identical resume and its cross-rank agreement rely on.

Ties and NaN follow the one ranking rule of :mod:`sparsetrain.selection`: among equal
magnitudes the lower position ranks higher, and NaN ranks below every number. The exact
selection is that rule's top-k (positions ascending). The sampled threshold takes every entry
with ``|x| >= t`` (entries tied at ``t`` pass together; NaN never passes) and, when more than
``k`` pass, keeps the ``k`` of them that rank highest by the rule; so its result is, as a set,
the rule's top-``C`` for some ``C <= k``. Its order is not specified (ascending unless it was
trimmed to k; trimmed, by magnitude on CUDA, as ``torch.topk`` gives it on the CPU).

How the entries at or above a threshold are found depends on the device, never the result:
the CPU search is in :mod:`._topk_cpu`, the CUDA search in :mod:`._topk_cuda`; the choices
between equivalent methods are a :class:`TopkTuning`, passed explicitly (``DEFAULT_TUNING``
unless given).

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold.

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

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..selection import topk_positions
from . import _topk_cpu, _topk_cuda, compact

__all__ = [
    "DEFAULT_TUNING",
    "TopkTuning",
    "num_selected",
    "sample_stride",
    "select_indices",
    "threshold_indices",
    "threshold_indices_segments",
    "topk_indices",
]


@dataclass(frozen=True, kw_only=True)
class TopkTuning:
    """How the sampled-threshold selection finds its entries: choices between methods that give the
    same positions (see each field), kept apart from the selection's arguments because they change
    only its speed. ``benchmarks/gpu_topk.py`` times the CUDA choices; the measurements that chose
    the defaults are in ``benchmarks/RESULTS.md``.

    Attributes:
        cuda_search: how CUDA finds the entries at or above a threshold: ``"compact"`` (two Triton
            passes writing only the hits, :mod:`.compact`; ``"mask"`` where Triton is missing),
            ``"mask"`` (one fused compare of the whole tensor, then ``nonzero``) or ``"grouped"``
            (column maxima, then only the columns that reach the threshold).
        cuda_final: for the ``"mask"`` and ``"grouped"`` searches, how CUDA keeps the k largest
            candidates: ``"sort"`` (a stable sort: the same positions, in the same order, as
            ``"compact"``) or ``"topk"`` (which of several equal magnitudes at the k-th place are
            kept may then differ).
        cuda_sample_kth: how CUDA finds the sample's k-th largest: ``"sort"`` (one radix sort of
            the sample) or ``"topk"``; the same value either way.
        cuda_fused_compare: fuse the ``"mask"`` search's ``|x| >= t`` into one pass with
            ``torch.compile`` (where it works); else eager.
        grouped_below: below this expected fraction of entries at or above the threshold, the CPU
            search (and CUDA's ``"grouped"``) goes through column maxima; above it, through a mask
            of the whole tensor.
        group_rows: rows the tensor is read as for the column maxima.

    Raises:
        ValueError: a field outside its allowed values.
    """

    cuda_search: Literal["compact", "mask", "grouped"] = "compact"
    cuda_final: Literal["sort", "topk"] = "sort"
    cuda_sample_kth: Literal["sort", "topk"] = "sort"
    cuda_fused_compare: bool = True
    grouped_below: float = 0.005
    group_rows: int = 16

    def __post_init__(self) -> None:
        for name, allowed in (("cuda_search", ("compact", "mask", "grouped")), ("cuda_final", ("sort", "topk")),
                              ("cuda_sample_kth", ("sort", "topk"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.cuda_fused_compare, bool):
            raise ValueError(f"`cuda_fused_compare` must be a bool, got {self.cuda_fused_compare!r}")
        if not 0.0 <= self.grouped_below <= 1.0:
            raise ValueError(f"`grouped_below` must be in [0, 1], got {self.grouped_below}")
        if isinstance(self.group_rows, bool) or not isinstance(self.group_rows, int) or self.group_rows < 1:
            raise ValueError(f"`group_rows` must be an integer >= 1, got {self.group_rows!r}")


#: The tuning every selection uses unless given another.
DEFAULT_TUNING = TopkTuning()


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
    """Positions of the ``k`` entries of largest ``|x_N|``, ascending (exact).

    Ties and NaN follow the ranking rule of :mod:`sparsetrain.selection`: among equal
    magnitudes the lower position is taken, and NaN ranks below every number.
    """
    _check_flat(x_N, k)
    if k >= x_N.numel():
        return torch.arange(x_N.numel(), device=x_N.device)
    return topk_positions(x_N.abs(), k)


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
    tuning: TopkTuning | None = None,
) -> torch.Tensor:
    """Positions of at most ``k`` large entries of ``|x_N|``, found through a sampled threshold.

    The sample is ``|x_N[offset::stride]|``; its ``ceil(margin * k * S / N)``-th largest value
    is the first threshold (aiming ``margin`` above k, so that usually at least k entries pass
    and exactly k are kept). The result is always, as a set, ``topk_indices(x_N, C)`` for some
    ``C <= k`` (the rule's top-``C``: everything selected is at least as large as everything
    left out, ties by position), with ``C >= lower_bound * k`` unless ``max_rounds`` ran out.
    ``stride == 1`` is exact top-k. A NaN in the sample makes the threshold NaN: then nothing
    passes and the result is empty.

    How the entries at or above a threshold are found depends on the device and ``tuning``,
    never the result: on CUDA two Triton passes writing only the hits (or see
    :class:`TopkTuning`), on the CPU :func:`._topk_cpu._cpu_search`.

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
        tuning: how to search (:class:`TopkTuning`); ``DEFAULT_TUNING`` when None.

    Returns:
        int64 positions, ``C`` of them.

    Raises:
        ValueError: an argument outside its range.
        TypeError: ``tuning`` is not a :class:`TopkTuning`.
    """
    _check_flat(x_N, k)
    if stride < 1:
        raise ValueError(f"`stride` must be >= 1, got {stride}")
    _check_rounds(lower_bound, max_rounds, margin)
    tuning = _check_tuning(tuning)
    n = x_N.numel()
    if stride == 1 or k >= n:
        return topk_indices(x_N, k)
    o = offset % stride
    n_sample = (n - o + stride - 1) // stride
    k_s = min(n_sample, max(1, math.ceil(margin * k * n_sample / n)))
    if x_N.is_cuda:
        by_sort = tuning.cuda_sample_kth == "sort"
        if tuning.cuda_search == "compact" and compact.available(x_N):
            threshold = _topk_cuda._kth_largest(x_N[o::stride].abs(), k_s, by_sort=by_sort)
            return _topk_cuda._compact_select(x_N, k, threshold, lower_bound, max_rounds, margin)
        threshold, at_least, magnitudes = _topk_cuda._mask_search(
            x_N, o, stride, k_s, margin * k / n, grouped=tuning.cuda_search == "grouped", by_sort=by_sort,
            fused=tuning.cuda_fused_compare, rows=tuning.group_rows, grouped_below=tuning.grouped_below)
    else:
        threshold, at_least, magnitudes = _topk_cpu._cpu_search(
            x_N, stride, o, k_s, margin * k / n, scratch, mask_scratch, rows=tuning.group_rows,
            grouped_below=tuning.grouped_below)
    for round_ in range(max_rounds):
        idx_C = at_least(threshold)
        if idx_C.numel() >= lower_bound * k or round_ == max_rounds - 1:
            break
        threshold = threshold * lower_bound
    if idx_C.numel() > k:  # the k largest candidates, by the rule of sparsetrain.selection
        values_C = magnitudes(idx_C)
        if x_N.is_cuda:
            idx_C = idx_C[_topk_cuda._largest(values_C, k, by_sort=tuning.cuda_final == "sort")]
        else:
            idx_C = idx_C[topk_positions(values_C, k, ascending=False)]
    return idx_C


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


def _check_tuning(tuning: TopkTuning | None) -> TopkTuning:
    if tuning is None:
        return DEFAULT_TUNING
    if not isinstance(tuning, TopkTuning):
        raise TypeError(f"`tuning` must be a TopkTuning or None, got {type(tuning).__name__}")
    return tuning


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
    tuning: TopkTuning | None = None,
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
    selection on the same values as :func:`threshold_indices`, so that ties at the k-th place
    are broken alike), and the rare segment whose first threshold lets fewer than
    ``lower_bound * k`` entries pass, which repeats :func:`threshold_indices` on its own.

    Args:
        x_N: flat tensor.
        segments: ``(start, numel, k, stride)`` per segment, ascending and not overlapping.
        offset, lower_bound, max_rounds, margin: as for :func:`threshold_indices`.
        scratch: optional float tensor of N elements that may be overwritten.
        mask_scratch: optional bool tensor of at least ``8 * ceil(N / 8)`` elements that may be
            overwritten.
        tuning: how to search (:class:`TopkTuning`); ``DEFAULT_TUNING`` when None.

    Returns:
        ``(idx, counts)``: int64 positions in ``x_N``, segment after segment, and how many
        belong to each segment.

    Raises:
        ValueError: a segment outside ``x_N`` or overlapping the previous one, or an argument
            outside its range (as for :func:`threshold_indices`).
        TypeError: ``tuning`` is not a :class:`TopkTuning`.
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
    tuning = _check_tuning(tuning)
    device = x_N.device
    if not segments:
        return torch.zeros(0, dtype=torch.long, device=device), []

    def one(s: int, n: int, k: int, stride: int) -> torch.Tensor:
        return threshold_indices(x_N[s : s + n], k, stride=stride, offset=offset, lower_bound=lower_bound,
                                 max_rounds=max_rounds, margin=margin, tuning=tuning).add_(s)

    if x_N.is_cuda and tuning.cuda_search == "compact" and x_N.dtype == torch.float32 and compact.available(x_N):
        return _topk_cuda._compact_segments(x_N, segments, offset, lower_bound, max_rounds, margin, one)
    if x_N.is_cuda or not x_N.is_contiguous():
        parts = [one(*seg) for seg in segments]
        return torch.cat(parts), [p.numel() for p in parts]
    return _topk_cpu._cpu_segments(x_N, segments, offset, lower_bound, max_rounds, margin, scratch, mask_scratch, one,
                                   rows=tuning.group_rows, grouped_below=tuning.grouped_below)
