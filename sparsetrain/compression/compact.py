"""Stream compaction on CUDA: every entry with ``|x| >= t``, in position order.

The sampled-threshold selection (:func:`sparsetrain.compression.topk.threshold_indices`) needs the
positions of the few entries (about 0.1%) of a large gradient at or above a threshold. Done with
torch ops that is a compare writing a bool mask of the whole tensor, then ``nonzero`` reading it
back. Here two Triton passes read the tensor and write nothing but the hits: the first counts the
hits of each block of ``BLOCK`` entries, an exclusive cumulative sum of the counts gives each block
its offset, and the second pass writes each block's hits there, in position order, as int64 keys
holding the magnitude's fp32 bits above the position (so that keeping the k largest needs no
gather from the tensor). A block with a single hit, the most common case at low density, needs
no scan. One pass that reserves room with an atomic add per block measured slower (the blocks'
atomics on one counter serialise; ``benchmarks/RESULTS.md``). NaN never passes ``>=``; ``-0.0`` passes as ``0.0``.

Legend: N elements of the tensor, B blocks, C hits (entries at or above the threshold).
"""

from __future__ import annotations

import torch

from .._triton import build_once

__all__ = [
    "at_least", "available", "block_table", "count_at_least", "count_segments", "split", "write_hits",
    "write_segments",
]

_LOW = (1 << 32) - 1

#: Entries per Triton program, and warps per program of the counting and the writing pass: the
#: defaults (constants; the single-tensor passes take others as arguments, which
#: ``benchmarks/gpu_topk.py --tune`` times; the measurements are in ``benchmarks/RESULTS.md``).
BLOCK = 1024
COUNT_WARPS = 4
WRITE_WARPS = 4

_kernel = None  # the Triton kernel, built on first use; False when Triton is missing


def _build():
    from . import _compact_kernels as k  # imports Triton

    return k.count_kernel, k.write_kernel, k.segment_count_kernel, k.segment_write_kernel


def available(x_N: torch.Tensor) -> bool:
    """Whether :func:`at_least` can run on ``x_N``: a contiguous CUDA float tensor of fewer
    than 2**31 elements, with Triton importable."""
    global _kernel
    if not (x_N.is_cuda and x_N.is_contiguous() and x_N.numel() < 2**31
            and x_N.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return False
    _kernel = build_once(_kernel, _build)
    return _kernel is not False


def count_at_least(
    x_N: torch.Tensor, threshold: torch.Tensor, *, block: int = BLOCK, warps: int = COUNT_WARPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: how many entries have ``|x_N| >= threshold``, and where each block's hits start.

    Nothing here waits for the device.

    Args:
        x_N: flat contiguous CUDA tensor (check :func:`available` first).
        threshold: 0-d tensor on the same device.
        block: entries per Triton program (a power of 2).
        warps: warps per program.

    Returns:
        ``(C, starts_B)``: the count as a 0-d device tensor, and the exclusive cumulative sum of
        the blocks' counts.
    """
    n = x_N.numel()
    counts_B = torch.empty(_cdiv(n, block), dtype=torch.int64, device=x_N.device)
    _kernel[0][(counts_B.numel(),)](x_N, threshold.reshape(1), counts_B, n, BLOCK=block, num_warps=warps)
    ends_B = torch.cumsum(counts_B, 0)
    return ends_B[-1].clone(), ends_B.sub_(counts_B)  # a copy: the view would see the subtraction


def write_hits(
    x_N: torch.Tensor, threshold: torch.Tensor, starts_B: torch.Tensor, cap: int, *, block: int = BLOCK,
    warps: int = WRITE_WARPS,
) -> torch.Tensor:
    """Pass 2: the first ``cap`` hits, in position order, as keys (see :func:`split`) in a new
    int64 tensor of ``cap`` entries (entries past the count are left unset). Nothing here waits
    for the device.

    Args:
        x_N, threshold: as for :func:`count_at_least`.
        starts_B: what :func:`count_at_least` returned for the same arguments.
        cap: room for this many hits.
        block: the ``block`` that :func:`count_at_least` was given.
        warps: warps per program.
    """
    keys = torch.empty(max(cap, 1), dtype=torch.int64, device=x_N.device)
    _kernel[1][(starts_B.numel(),)](x_N, threshold.reshape(1), starts_B, keys, x_N.numel(), cap,
                                    BLOCK=block, num_warps=warps)
    return keys


def split(keys_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, magnitude_bits)`` of keys ``bits(|x_i|) << 32 | i``: int64 positions, and the
    fp32 bit patterns of the magnitudes as int32, which order like the magnitudes (they are
    non-negative, infinity included)."""
    return keys_C & _LOW, (keys_C >> 32).to(torch.int32)


def at_least(x_N: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Keys of every entry with ``|x_N| >= threshold``, in position order (see :func:`split`).
    Waits for the device once, for the count.

    Args:
        x_N: flat contiguous CUDA tensor (check :func:`available` first).
        threshold: 0-d tensor on the same device.
    """
    c, starts_B = count_at_least(x_N, threshold)
    c = int(c)
    return write_hits(x_N, threshold, starts_B, c)[:c]


def block_table(bounds: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of the segment passes for segments ``[(start, numel), ...]`` of one tensor.

    Raises:
        ValueError: the segments overlap, are out of order, or one is empty.

    Returns:
        ``(table_B3, last_G)``: per block its first position, the end of its segment and the
        segment's number (int64, ``BLOCK`` positions or fewer per block, blocks in position
        order); and the number of each segment's last block.
    """
    end = 0
    for start, numel in bounds:
        if start < end or numel < 1:
            raise ValueError(f"`bounds` must be ascending, non-overlapping (start, numel) pairs with numel >= 1, "
                             f"got ({start}, {numel}) after end {end}")
        end = start + numel
    rows, last = [], []
    for g, (start, numel) in enumerate(bounds):
        end = start + numel
        rows += [(b, end, g) for b in range(start, end, BLOCK)]
        last.append(len(rows) - 1)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    return table.to(device), torch.tensor(last, dtype=torch.int64).to(device)


def count_segments(
    x_N: torch.Tensor, thresholds_G: torch.Tensor, table_B3: torch.Tensor, last_G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 over segments: how many entries of each segment have ``|x| >=`` its threshold.
    Nothing here waits for the device.

    Args:
        x_N: flat contiguous CUDA tensor (check :func:`available` first).
        thresholds_G: one threshold per segment (float32, same device).
        table_B3, last_G: from :func:`block_table`.

    Returns:
        ``(counts_G, starts_B)``: the segments' counts, and where each block's hits start in the
        output of :func:`write_segments` (segment after segment).
    """
    counts_B = torch.empty(table_B3.shape[0], dtype=torch.int64, device=x_N.device)
    _kernel[2][(counts_B.numel(),)](x_N, thresholds_G, table_B3, counts_B, BLOCK=BLOCK, num_warps=COUNT_WARPS)
    ends_B = torch.cumsum(counts_B, 0)
    ends_G = ends_B.index_select(0, last_G)
    counts_G = torch.diff(ends_G, prepend=ends_G.new_zeros(1))
    return counts_G, ends_B.sub_(counts_B)


def write_segments(
    x_N: torch.Tensor, thresholds_G: torch.Tensor, table_B3: torch.Tensor, starts_B: torch.Tensor, cap: int
) -> torch.Tensor:
    """Pass 2 over segments: the first ``cap`` hits, segment after segment and in position order
    within each, as keys (see :func:`split`; positions in ``x_N``), in a new int64 tensor of ``cap``
    entries. Nothing here waits for the device.

    Args:
        x_N, thresholds_G, table_B3: as for :func:`count_segments`.
        starts_B: what :func:`count_segments` returned for the same arguments.
        cap: room for this many hits.
    """
    keys = torch.empty(max(cap, 1), dtype=torch.int64, device=x_N.device)
    _kernel[3][(starts_B.numel(),)](x_N, thresholds_G, table_B3, starts_B, keys, cap, BLOCK=BLOCK,
                                    num_warps=WRITE_WARPS)
    return keys


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
