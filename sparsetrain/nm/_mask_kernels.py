"""The Triton kernel of :mod:`.grouped` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def nm_mask_kernel(wtab_ptr, blocks_ptr, w_one_ptr, groups_one, keep_ptr, pruned_ptr, old_ptr, flips_ptr,
                   N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BG: tl.constexpr,
                   DTYPE: tl.constexpr, FLIPS: tl.constexpr, ONE: tl.constexpr):
    """The N:M mask of ``BG`` groups of ``M`` consecutive weights per program.

    Several layers (``ONE`` false): one program per row of the block table ``(layer, first
    group)``; ``wtab`` holds per layer ``(weight address, groups, offset)``: the weight is read
    through its address (all layers in one launch), the masks are written at ``offset`` into flat
    buffers. One layer (``ONE``): ``w_one_ptr`` with ``groups_one`` groups, program ``i`` takes
    the ``i``-th ``BG`` groups, no tables. Ranks as ``masks._broadcast_keep``: |w| with NaN
    largest, ties to the lower index.
    """
    pid = tl.program_id(0)
    if ONE:
        g = pid.to(tl.int64) * BG + tl.arange(0, BG)
        w_ptr = w_one_ptr
        groups = groups_one
        base = 0
    else:
        layer = tl.load(blocks_ptr + 2 * pid)
        g = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BG)
        w_ptr = tl.load(wtab_ptr + 3 * layer).to(tl.pointer_type(DTYPE))
        groups = tl.load(wtab_ptr + 3 * layer + 1)
        base = tl.load(wtab_ptr + 3 * layer + 2)
    c = tl.arange(0, MP)
    offs = g[:, None] * M + c[None, :]
    inside = (g[:, None] < groups) & (c[None, :] < M)
    a = tl.abs(tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32))
    a = tl.where(a != a, float("inf"), a)
    a = tl.where(inside, a, -1.0)  # padding columns beat nobody
    a_i = a[:, :, None]  # entry i
    a_j = a[:, None, :]  # rival j, which wins a tie when earlier
    earlier = c[None, None, :] < c[None, :, None]
    beats = (a_j > a_i) | ((a_j == a_i) & earlier)
    keep = tl.sum(beats.to(tl.int32), axis=2) < N
    tl.store(keep_ptr + base + offs, keep.to(tl.int8), mask=inside)
    if not ONE:
        tl.store(pruned_ptr + base + offs, (~keep).to(tl.int8), mask=inside)
    if FLIPS:
        old = tl.load(old_ptr + base + offs, mask=inside, other=0) != 0
        flipped = ((old != keep) & inside).to(tl.int32)
        tl.store(flips_ptr + pid, tl.sum(tl.sum(flipped, axis=1), axis=0))


@triton.jit
def swap_kernel(tab_ptr, blocks_ptr, pruned_ptr, gtab_ptr, factor,
                DTYPE: tl.constexpr, BLOCK: tl.constexpr, RESTORE: tl.constexpr, DECAY: tl.constexpr):
    """Masks weights in place, or puts them back, ``BLOCK`` entries of one layer per program.

    ``tab`` holds per layer ``(weight address, shadow address, entries, offset)``; the block table
    ``(layer, first entry)``; ``pruned`` is the flat complement of all layers' masks (at ``offset``).
    Masking (``RESTORE`` false): ``shadow = w``, then ``w += factor * w * pruned`` with
    ``factor = beta - 1``, computed as CUDA's ``torch.addcmul`` does (``w + factor * (w * pruned)``,
    one fused multiply-add in fp32).
    Restoring: ``w = shadow``, and with ``DECAY`` the gradient (address in ``gtab``) gets
    ``factor * shadow * pruned`` added (SR-STE's term, ``factor = lambda_w``).
    """
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    offs = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK)
    w_ptr = tl.load(tab_ptr + 4 * layer).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(tab_ptr + 4 * layer + 1).to(tl.pointer_type(DTYPE))
    inside = offs < tl.load(tab_ptr + 4 * layer + 2)
    base = tl.load(tab_ptr + 4 * layer + 3)
    if RESTORE:
        s = tl.load(s_ptr + offs, mask=inside)
        tl.store(w_ptr + offs, s, mask=inside)
        if DECAY:
            g_ptr = tl.load(gtab_ptr + layer).to(tl.pointer_type(DTYPE))
            p = (tl.load(pruned_ptr + base + offs, mask=inside, other=0) != 0).to(tl.float32)
            g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
            tl.store(g_ptr + offs, (g + factor * (s.to(tl.float32) * p)).to(DTYPE), mask=inside)
    else:
        w = tl.load(w_ptr + offs, mask=inside)
        tl.store(s_ptr + offs, w, mask=inside)
        p = (tl.load(pruned_ptr + base + offs, mask=inside, other=0) != 0).to(tl.float32)
        wf = w.to(tl.float32)
        tl.store(w_ptr + offs, (wf + factor * (wf * p)).to(DTYPE), mask=inside)
