"""N:M masks of many layers in one Triton launch (CUDA).

:func:`sparsetrain.nm.nm_masks` runs here for CUDA weights when Triton is installed: one kernel
reads every layer's weight through an address table, writes each layer's mask (and its
complement, for the straight-through forward pass) into two flat bool buffers, and counts the
entries that differ from the previous masks. The host does one launch and no per-layer work
beyond slicing the buffers, where a compiled graph launches a kernel or two per layer from
Python. The masks equal :func:`~sparsetrain.nm.nm_mask`'s (same ranks, same ties, NaN largest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from .._triton import build_once

__all__ = ["available", "grouped_masks", "one_mask", "swap"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Entries ranked at once per program: a program compares every entry of its groups with every
#: other entry of the same group, ``groups * mp * mp`` comparisons for a padded group size ``mp``.
_TILE = 4096
_PLANS_KEPT = 8

_kernel = None  # built on first use; False where Triton is missing
_plans: OrderedDict = OrderedDict()


def _build():
    import triton.language as tl

    from . import _mask_kernels as k  # imports Triton

    dtypes = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    return k.nm_mask_kernel, dtypes, k.swap_kernel


def available(weights: Sequence[torch.Tensor], interpret: bool = False) -> bool:
    """Whether :func:`grouped_masks` can take ``weights``: contiguous fp32/fp16/bf16 tensors on
    one CUDA device (any device with ``interpret``, for Triton's interpreter), Triton importable
    (tried once)."""
    global _kernel
    if not weights:
        return False
    dev = weights[0].device
    for w in weights:
        if not (w.device == dev and w.is_contiguous() and w.dtype in _DTYPES):
            return False
    if dev.type != "cuda" and not interpret:
        return False
    _kernel = build_once(_kernel, _build)
    return _kernel is not False


class _Plan:
    """Address and block tables of one list of weights, built once while the weights stay put."""

    def __init__(self, weights: list[torch.Tensor], m: int, per_block: int) -> None:
        dev = weights[0].device
        self.numels = [w.numel() for w in weights]
        self.shapes = [w.shape for w in weights]
        self.offsets = []
        total = 0
        for numel in self.numels:
            self.offsets.append(total)
            total += numel
        self.total = total
        self.launches = []  # one per weight dtype: (dtype, address table, block table, layers)
        for dtype in dict.fromkeys(w.dtype for w in weights):
            layers = [i for i, w in enumerate(weights) if w.dtype == dtype]
            wtab = torch.tensor([[weights[i].data_ptr(), self.numels[i] // m, self.offsets[i]] for i in layers],
                                dtype=torch.int64)
            rows = []
            for j, i in enumerate(layers):
                starts = torch.arange(0, self.numels[i] // m, per_block, dtype=torch.int64)
                rows.append(torch.stack([torch.full_like(starts, j), starts], 1))
            blocks = torch.cat(rows)
            self.launches.append((dtype, wtab.to(dev), blocks.to(dev), layers))
        self.programs = sum(b.shape[0] for _, _, b, _ in self.launches)
        self.last_keep: torch.Tensor | None = None  # the flat buffer the previous masks are views of
        self.last_views: list[torch.Tensor] = []


def _plan(weights: list[torch.Tensor], n: int, m: int, per_block: int, interpret: bool) -> _Plan | None:
    key = (n, m, per_block, interpret,
           tuple((w.data_ptr(), w.shape, w.stride(), w.dtype, w.get_device()) for w in weights))
    plan = _plans.get(key)
    if plan is None:
        if not available(weights, interpret):
            return None
        plan = _plans[key] = _Plan(weights, m, per_block)
        while len(_plans) > _PLANS_KEPT:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def one_mask(weight: torch.Tensor, n: int, m: int, interpret: bool = False) -> torch.Tensor | None:
    """The N:M mask of one weight in one launch, with no launch tables (what a forward pass computes
    per layer); None where :func:`available` says no."""
    if not available([weight], interpret):
        return None
    kernel, tl_dtypes, _ = _kernel
    mp = 1 << (m - 1).bit_length()
    per_block = max(1, _TILE // (mp * mp))
    groups = weight.numel() // m
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    k8 = keep.view(torch.int8)
    kernel[(_cdiv(groups, per_block),)](
        k8, k8, weight, groups, k8, k8, k8, k8,
        N=n, M=m, MP=mp, BG=per_block, DTYPE=tl_dtypes[weight.dtype], FLIPS=False, ONE=True, num_warps=4)
    return keep


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouped_masks(
    weights: Sequence[torch.Tensor],
    n: int,
    m: int,
    olds: Sequence[torch.Tensor] | None = None,
    interpret: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None] | None:
    """N:M masks of ``weights`` (groups of ``m`` consecutive entries of the flattened weight), their
    complements, and the number of entries that differ from ``olds``, in one Triton launch per
    weight dtype; None where :func:`available` says no. ``m`` must divide every weight's
    reduction dim (the caller's checks). The launch tables are built on the first call for a list
    of weights and reused while the weights keep their addresses, shapes and dtypes.

    The masks of one call are views of one flat buffer (so are the complements): each call
    returns new tensors, and the previous ones are never written again.

    Args:
        weights: contiguous weights on one device.
        n: entries kept per group.
        m: group size.
        olds: the previous mask of every weight (bool, same shapes), or None for no count.
        interpret: allow CPU tensors, for Triton's interpreter (``TRITON_INTERPRET=1``).

    Returns:
        ``(masks, pruned, flips)``: bool masks, their complements, and a 0-dim int64 tensor (None
        without ``olds``); or None.
    """
    weights = list(weights)
    mp = 1 << (m - 1).bit_length()
    per_block = max(1, _TILE // (mp * mp))
    plan = _plan(weights, n, m, per_block, interpret)
    if plan is None or not _kernel:
        return None
    kernel, tl_dtypes, _ = _kernel
    dev = weights[0].device
    keep = torch.empty(plan.total, dtype=torch.bool, device=dev)
    pruned = torch.empty(plan.total, dtype=torch.bool, device=dev)
    flips = old = None
    if olds is not None:
        olds = list(olds)
        if plan.last_keep is not None and len(olds) == len(plan.last_views) and all(
                a is b for a, b in zip(olds, plan.last_views)):
            old = plan.last_keep  # the previous call's masks, untouched: no gather
        else:
            old = torch.cat([o.reshape(-1) for o in olds])
        flips = torch.empty(plan.programs, dtype=torch.int32, device=dev)
    done = 0
    for dtype, wtab, blocks, _ in plan.launches:
        programs = blocks.shape[0]
        kernel[(programs,)](
            wtab, blocks, weights[0], 0, keep.view(torch.int8), pruned.view(torch.int8),
            old.view(torch.int8) if old is not None else keep.view(torch.int8),
            flips[done:] if flips is not None else keep,
            N=n, M=m, MP=mp, BG=per_block, DTYPE=tl_dtypes[dtype], FLIPS=flips is not None, ONE=False,
            num_warps=4)
        done += programs
    masks = [v.view(s) for v, s in zip(keep.split(plan.numels), plan.shapes)]
    comps = [v.view(s) for v, s in zip(pruned.split(plan.numels), plan.shapes)]
    plan.last_keep, plan.last_views = keep, masks
    return masks, comps, (flips.sum(dtype=torch.int64) if flips is not None else None)


#: Entries per program of the in-place masking kernel.
_SWAP_BLOCK = 2048
_swap_tables: OrderedDict = OrderedDict()
_grad_table: list = [None, None]  # (key, device table) of the last gradients seen


def _table(rows: list, dev: torch.device) -> torch.Tensor:
    """An int64 table on ``dev`` without blocking the host (pinned staging for CUDA)."""
    t = torch.tensor(rows, dtype=torch.int64)
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def _swappable(weights: list[torch.Tensor], shadows: list[torch.Tensor], interpret: bool) -> bool:
    """Whether :func:`swap` can take these weights and shadows (see there)."""
    if not available(weights, interpret) or not _kernel:
        return False
    dtype, dev = weights[0].dtype, weights[0].device
    return len(shadows) == len(weights) and all(w.dtype == dtype for w in weights) and all(
        s.dtype == dtype and s.device == dev and s.is_contiguous() and s.shape == w.shape
        for s, w in zip(shadows, weights))


def swap(weights: Sequence[torch.Tensor], shadows: Sequence[torch.Tensor], pruned: torch.Tensor, factor: float,
         restore: bool = False, grads: Sequence[torch.Tensor] | None = None, interpret: bool = False) -> bool:
    """Mask ``weights`` in place keeping their dense values in ``shadows``, or put them back, in one
    Triton launch; False (nothing done) where it cannot: the caller then runs the torch ops.

    Masking: ``shadow.copy_(w); w.addcmul_(shadow, pruned_i, value=factor)`` per layer
    (``factor = beta - 1``). Restoring: ``w.copy_(shadow)`` and, with ``grads``,
    ``grad.addcmul_(shadow, pruned_i, value=factor)`` (``factor = lambda_w``). Results equal those
    ops on CUDA bit for bit (same fp32 formula, one fused multiply-add).

    Args:
        weights: contiguous weights of one dtype on one device (any device with ``interpret``).
        shadows: one contiguous tensor per weight, same shape and dtype.
        pruned: the flat bool complement of all layers' masks, in order (``numel`` = all weights').
        factor: ``beta - 1`` when masking, ``lambda_w`` when restoring.
        restore: put the dense weights back instead of masking.
        grads: with ``restore``: each weight's contiguous gradient, to add SR-STE's term to.
    """
    weights, shadows = list(weights), list(shadows)
    if not (pruned.dtype == torch.bool and pruned.is_contiguous()):
        return False
    # Checked once per list of weights: a step's host time is what this path saves, so the hit
    # path only looks up the addresses.
    ptr = torch.Tensor.data_ptr
    key = (interpret, tuple(map(ptr, weights)), tuple(map(ptr, shadows)))
    tabs = _swap_tables.get(key)
    if tabs is None:
        if not _swappable(weights, shadows, interpret):
            return False
        rows, blocks, total = [], [], 0
        for i, (w, s) in enumerate(zip(weights, shadows)):
            rows.append([w.data_ptr(), s.data_ptr(), w.numel(), total])
            blocks.extend([i, start] for start in range(0, w.numel(), _SWAP_BLOCK))
            total += w.numel()
        dev = weights[0].device
        tabs = _swap_tables[key] = (_table(rows, dev), _table(blocks, dev), total, weights[0].dtype, dev)
        while len(_swap_tables) > _PLANS_KEPT:
            _swap_tables.popitem(last=False)
    tab, blocks, total, dtype, dev = tabs
    if pruned.numel() != total or pruned.device != dev:
        raise ValueError(f"`pruned` must hold all {total} weight entries on {dev}, got {pruned.numel()} "
                         f"on {pruned.device}")
    gtab = tab
    if grads is not None:
        if any(g is None for g in grads):
            return False
        gkey = (interpret, dev, tuple(map(ptr, grads)))
        if _grad_table[0] != gkey:
            if not all(g.dtype == dtype and g.device == dev and g.is_contiguous() and g.shape == w.shape
                       for g, w in zip(grads, weights)):
                return False
            _grad_table[:] = [gkey, _table([g.data_ptr() for g in grads], dev)]
        gtab = _grad_table[1]
    _, tl_dtypes, kernel = _kernel
    kernel[(blocks.shape[0],)](
        tab, blocks, pruned.view(torch.int8), gtab, float(factor),
        DTYPE=tl_dtypes[dtype], BLOCK=_SWAP_BLOCK, RESTORE=restore, DECAY=grads is not None, num_warps=4)
    return True
