"""Stream compaction on CUDA: every entry with ``|x| >= t``, in position order.

The sampled-threshold selection (:func:`sparsetrain.compression.topk.threshold_indices`) needs the
positions of the few entries (about 0.1%) of a large gradient at or above a threshold. Done with
torch ops that is a compare writing a bool mask of the whole tensor, then ``nonzero`` reading it
back. Here two Triton passes write nothing but the hits: the first reads the tensor, counts the
hits of each block of ``BLOCK`` entries and writes them as one bit per entry (1/32 of the
tensor's fp32 bytes); an exclusive cumulative sum of the counts gives each block its offset; the
second pass reads the bits and, of the tensor, only the hits, and writes each block's hits at its
offset, in position order, as int64 keys holding the magnitude's fp32 bits above the position (so
that keeping the k largest needs no gather from the tensor). A block with a single hit, the most
common case at low density, needs no scan. One pass that reserves room with an atomic add per
block was slower on an H100 (the blocks' atomics on one counter serialise), and so was one pass
into a few slots per block followed by a gather on an H200. NaN never passes ``>=``; ``-0.0``
passes as ``0.0``.

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
    def count_kernel(x_ptr, t_ptr, counts_ptr, bits_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        a = tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))
        hit_i = ((a >= tl.load(t_ptr).to(tl.float32)) & inside).to(tl.int32)
        tl.store(counts_ptr + pid, tl.sum(hit_i, axis=0))
        # The block's hits as BLOCK // 32 words, bit j of word w for entry 32 w + j.
        bit = tl.reshape(hit_i, (BLOCK // 32, 32)) << tl.arange(0, 32)[None, :]
        tl.store(bits_ptr + pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32), tl.sum(bit, axis=1))

    @triton.jit
    def write_kernel(x_ptr, bits_ptr, starts_ptr, keys_ptr, n, cap, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        words = tl.load(bits_ptr + pid * (BLOCK // 32) + tl.arange(0, BLOCK // 32))
        hit_i = tl.reshape((words[:, None] >> tl.arange(0, 32)[None, :]) & 1, (BLOCK,))
        c = tl.sum(hit_i, axis=0)
        if c > 0:
            offs = pid * BLOCK + tl.arange(0, BLOCK)
            hit = hit_i != 0
            a = tl.abs(tl.load(x_ptr + offs, mask=hit, other=0.0).to(tl.float32))  # the hits only
            key = (a.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs
            start = tl.load(starts_ptr + pid)
            if c == 1:  # the most common case at low density: no scan needed
                one = tl.max(tl.where(hit, key, -1), axis=0)
                if start < cap:
                    tl.store(keys_ptr + start, one)
            else:
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


def count_at_least(x_N: torch.Tensor,
                   threshold: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pass 1: how many entries have ``|x_N| >= threshold``; where each block's hits start, and which
    entries they are (a bit per entry). Nothing here waits for the device.

    Args:
        x_N: flat contiguous CUDA tensor (check :func:`available` first).
        threshold: 0-d tensor on the same device.

    Returns:
        ``(C, counted)``: the count as a 0-d device tensor, and what :func:`write_hits` needs.
    """
    n = x_N.numel()
    blocks = _cdiv(n, BLOCK)
    counts_B = torch.empty(blocks, dtype=torch.int64, device=x_N.device)
    bits_BW = torch.empty((blocks, BLOCK // 32), dtype=torch.int32, device=x_N.device)
    _kernel[0][(blocks,)](x_N, threshold.reshape(1), counts_B, bits_BW, n, BLOCK=BLOCK, num_warps=COUNT_WARPS)
    ends_B = torch.cumsum(counts_B, 0)
    return ends_B[-1].clone(), (ends_B.sub_(counts_B), bits_BW)  # a copy: the view would see the subtraction


def write_hits(x_N: torch.Tensor, counted: tuple[torch.Tensor, torch.Tensor], cap: int) -> torch.Tensor:
    """Pass 2: the first ``cap`` hits, in position order, as keys (see :func:`split`) in a new
    int64 tensor of ``cap`` entries (entries past the count are left unset). It reads pass 1's bits
    and, of the tensor, only the hits. Nothing here waits for the device.

    Args:
        x_N: as for :func:`count_at_least`.
        counted: what :func:`count_at_least` returned for it.
        cap: room for this many hits.
    """
    starts_B, bits_BW = counted
    keys = torch.empty(max(cap, 1), dtype=torch.int64, device=x_N.device)
    _kernel[1][(starts_B.numel(),)](x_N, bits_BW, starts_B, keys, x_N.numel(), cap,
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
    c, counted = count_at_least(x_N, threshold)
    c = int(c)
    return write_hits(x_N, counted, c)[:c]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
