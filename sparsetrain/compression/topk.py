"""Top-k selection of gradient entries by magnitude: exact, and DGC's sampled threshold.

Both selectors take a flat tensor ``x_N`` and return the int64 positions of (at most) ``k``
entries of largest ``|x|``, in no particular order. They are pure functions: the same input
gives the same positions on every rank and every run, which is what the comm hook's
bit-identical resume and its cross-rank agreement rely on.

Legend: N elements of the tensor, S elements of the sample, C candidates above a threshold.

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

import torch

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
) -> torch.Tensor:
    """Positions of at most ``k`` large entries of ``|x_N|``, found through a sampled threshold.

    The sample is ``|x_N[offset::stride]|``; its ``ceil(margin * k * S / N)``-th largest value
    is the first threshold (aiming ``margin`` above k, so that usually at least k entries pass
    and exactly k are kept). The result is always the top-``C`` set of ``|x_N|`` for some
    ``C <= k`` (everything selected is at least as large as everything left out), with
    ``C >= lower_bound * k`` unless ``max_rounds`` ran out. ``stride == 1`` is exact top-k.

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
    sample_S = x_N[offset % stride :: stride].abs()
    k_s = min(sample_S.numel(), max(1, math.ceil(margin * k * sample_S.numel() / n)))
    threshold = torch.topk(sample_S, k_s, sorted=False).values.min()
    mag_N = None
    if not x_N.is_cuda:
        mag_N = torch.abs(x_N, out=scratch) if scratch is not None and scratch.numel() == n else x_N.abs()
    for round_ in range(max_rounds):
        mask_N = (mag_N >= threshold) if mag_N is not None else _at_least(x_N, threshold)
        idx_C = mask_N.nonzero().view(-1)
        if idx_C.numel() >= lower_bound * k or round_ == max_rounds - 1:
            break
        threshold = threshold * lower_bound
    if idx_C.numel() > k:
        cand = mag_N[idx_C] if mag_N is not None else x_N[idx_C].abs()
        idx_C = idx_C[torch.topk(cand, k, sorted=False).indices]
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


def _check_flat(x_N: torch.Tensor, k: int) -> None:
    if x_N.dim() != 1:
        raise ValueError(f"`x_N` must be 1-D, got shape {tuple(x_N.shape)}")
    if not 1 <= k <= x_N.numel():
        raise ValueError(f"`k` must be in [1, {x_N.numel()}], got {k}")


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
