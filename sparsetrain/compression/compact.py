"""Stream compaction on CUDA: every entry with ``|x| >= t``, in position order.

The sampled-threshold selection (:func:`sparsetrain.compression.topk.threshold_indices`) needs the
positions of the few entries (about 0.1%) of a large gradient at or above a threshold. Done with
torch ops that is a compare writing a bool mask of the whole tensor, then ``nonzero`` reading it
back. Here two Triton passes read the tensor and write nothing but the hits: the first counts the
hits of each block of ``BLOCK`` entries, an exclusive cumulative sum of the counts gives each block
its offset, and the second pass writes each block's hits there, in position order, as int64 keys
holding the magnitude's fp32 bits above the position (so that keeping the k largest needs no
gather from the tensor). A block with a single hit, the most common case at low density, needs
no scan. One pass that reserves room with an atomic add per block was slower on an H100: the
blocks' atomics on one counter serialise. NaN never passes ``>=``; ``-0.0`` passes as ``0.0``.

Legend: N elements of the tensor, B blocks, C hits (entries at or above the threshold).
"""

from __future__ import annotations

import torch

__all__ = ["at_least", "available", "count_at_least", "split", "write_hits"]

_LOW = (1 << 32) - 1

#: Entries per Triton program, and warps per program of the counting and the writing pass
#: (``benchmarks/gpu_topk.py --tune`` times the choices; these were the fastest on an H200).
BLOCK = 1024
COUNT_WARPS = 4
WRITE_WARPS = 4

_kernel = None  # the Triton kernel, built on first use; False when Triton is missing


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def count_kernel(x_ptr, t_ptr, counts_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))
        hit = (a >= tl.load(t_ptr).to(tl.float32)) & inside
        tl.store(counts_ptr + pid, tl.sum(hit.to(tl.int32), axis=0))

    @triton.jit
    def write_kernel(x_ptr, t_ptr, starts_ptr, keys_ptr, n, cap, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))
        hit = (a >= tl.load(t_ptr).to(tl.float32)) & inside
        hit_i = hit.to(tl.int32)
        c = tl.sum(hit_i, axis=0)
        key = (a.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs
        start = tl.load(starts_ptr + pid)
        if c == 1:  # the most common case at low density: no scan needed
            one = tl.max(tl.where(hit, key, -1), axis=0)
            if start < cap:
                tl.store(keys_ptr + start, one)
        elif c > 1:
            pos = start + tl.cumsum(hit_i, axis=0) - 1
            tl.store(keys_ptr + pos, key, mask=hit & (pos < cap))

    return count_kernel, write_kernel


def available(x_N: torch.Tensor) -> bool:
    """Whether :func:`at_least` can run on ``x_N``: a contiguous CUDA float tensor of fewer
    than 2**31 elements, with Triton importable."""
    global _kernel
    if not (x_N.is_cuda and x_N.is_contiguous() and x_N.numel() < 2**31
            and x_N.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return False
    if _kernel is None:
        try:
            _kernel = _build()
        except Exception:  # noqa: BLE001 - no Triton: the caller takes the torch path
            _kernel = False
    return _kernel is not False


def count_at_least(x_N: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: how many entries have ``|x_N| >= threshold``, and where each block's hits start.

    Nothing here waits for the device.

    Args:
        x_N: flat contiguous CUDA tensor (check :func:`available` first).
        threshold: 0-d tensor on the same device.

    Returns:
        ``(C, starts_B)``: the count as a 0-d device tensor, and the exclusive cumulative sum of
        the blocks' counts.
    """
    n = x_N.numel()
    counts_B = torch.empty(_cdiv(n, BLOCK), dtype=torch.int64, device=x_N.device)
    _kernel[0][(counts_B.numel(),)](x_N, threshold.reshape(1), counts_B, n, BLOCK=BLOCK, num_warps=COUNT_WARPS)
    ends_B = torch.cumsum(counts_B, 0)
    return ends_B[-1].clone(), ends_B.sub_(counts_B)  # a copy: the view would see the subtraction


def write_hits(x_N: torch.Tensor, threshold: torch.Tensor, starts_B: torch.Tensor, cap: int) -> torch.Tensor:
    """Pass 2: the first ``cap`` hits, in position order, as keys (see :func:`split`) in a new
    int64 tensor of ``cap`` entries (entries past the count are left unset). Nothing here waits
    for the device.

    Args:
        x_N, threshold: as for :func:`count_at_least`.
        starts_B: what :func:`count_at_least` returned for the same arguments.
        cap: room for this many hits.
    """
    keys = torch.empty(max(cap, 1), dtype=torch.int64, device=x_N.device)
    _kernel[1][(starts_B.numel(),)](x_N, threshold.reshape(1), starts_B, keys, x_N.numel(), cap,
                                    BLOCK=BLOCK, num_warps=WRITE_WARPS)
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
