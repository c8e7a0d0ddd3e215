"""The Triton kernels of :mod:`.compact` (imported only where Triton is installed).

The helpers are module-level functions so that Triton resolves them as globals when it compiles
(or interprets) the kernels that call them.
"""

import triton
import triton.language as tl


@triton.jit
def hits_of(x_ptr, t, offs, inside):
    a = tl.abs(tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32))
    return a, (a >= t) & inside


@triton.jit
def store_hits(keys_ptr, a, hit, offs, start, cap):
    hit_i = hit.to(tl.int32)
    c = tl.sum(hit_i, axis=0)
    key = (a.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs
    if c == 1:  # the most common case at low density: no scan needed
        one = tl.max(tl.where(hit, key, -1), axis=0)
        if start < cap:
            tl.store(keys_ptr + start, one)
    elif c > 1:
        pos = start + tl.cumsum(hit_i, axis=0) - 1
        tl.store(keys_ptr + pos, key, mask=hit & (pos < cap))


@triton.jit
def count_kernel(x_ptr, t_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    a, hit = hits_of(x_ptr, tl.load(t_ptr).to(tl.float32), offs, offs < n)
    tl.store(counts_ptr + pid, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def write_kernel(x_ptr, t_ptr, starts_ptr, keys_ptr, n, cap, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    a, hit = hits_of(x_ptr, tl.load(t_ptr).to(tl.float32), offs, offs < n)
    store_hits(keys_ptr, a, hit, offs, tl.load(starts_ptr + pid), cap)


# The same passes over several segments of one tensor, each with its own threshold: a
# program per row of a block table (start, end, segment), no block straddling two segments.
@triton.jit
def segment_count_kernel(x_ptr, t_ptr, table_ptr, counts_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.load(table_ptr + 3 * pid) + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + tl.load(table_ptr + 3 * pid + 2)).to(tl.float32)
    a, hit = hits_of(x_ptr, t, offs, offs < tl.load(table_ptr + 3 * pid + 1))
    tl.store(counts_ptr + pid, tl.sum(hit.to(tl.int32), axis=0))


@triton.jit
def segment_write_kernel(x_ptr, t_ptr, table_ptr, starts_ptr, keys_ptr, cap, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.load(table_ptr + 3 * pid) + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + tl.load(table_ptr + 3 * pid + 2)).to(tl.float32)
    a, hit = hits_of(x_ptr, t, offs, offs < tl.load(table_ptr + 3 * pid + 1))
    store_hits(keys_ptr, a, hit, offs, tl.load(starts_ptr + pid), cap)
