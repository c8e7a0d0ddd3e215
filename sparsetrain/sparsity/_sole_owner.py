"""Whether a gradient hook may mask a gradient in place: the one use of private torch internals.

The sparsifier's gradient hook turns each weight gradient into ``torch.where(mask, g, 0)``. Doing
it in place saves a new tensor per layer and backward pass (measured in
``benchmarks/results/dynamic_sparsity.md``, "In-place gradient masking"), but is only allowed when
nothing but the autograd engine and the hook refers to the gradient. A gradient can be shared: an
addition hands the same tensor to both of its inputs, a user's hook or a custom backward may keep
it, a view may share its storage with other gradients. Telling those apart needs four reference
counts that torch does not expose publicly:

- ``sys.getrefcount(grad)``: references to the Python object;
- ``grad._use_count()`` and ``grad._base._use_count()``: references to the tensor and its view base;
- ``torch._C._storage_Use_Count(...)``: references to their storage.

:func:`sole_refs` measures them once per process on gradients known to be unshared (a plain one
and a view, as a Linear weight's gradient is); :func:`sole_owner` compares a hook's gradient with
them -- the test torch's ``AccumulateGrad`` makes before it takes a gradient over without copying.
Where torch lacks a counter, or the measurement fails, :func:`sole_refs` gives ``None`` and every
gradient is masked out of place (``torch.where``, the plain public path, which gives the same
values bit for bit). ``tests/sparsetrain/sparsity/test_sole_owner.py`` fails loudly when a torch
release changes what this relies on.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

__all__ = ["SoleRefs", "ref_counts", "sole_owner", "sole_refs"]

#: The reference counts (Python object, gradient, its view base, their storage) of a gradient that
#: only the autograd engine and the hook hold, as a tensor hook sees them, for a gradient that is not
#: a view (index 0) and one that is (index 1); None where no such gradient could be measured.
SoleRefs = tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]


def ref_counts(grad: torch.Tensor, python_refs: int) -> tuple[int, int, int, int]:
    """The four counts of ``grad`` (``python_refs`` is ``sys.getrefcount(grad)`` taken by the caller)."""
    base = grad._base
    return (python_refs, grad._use_count(), 0 if base is None else base._use_count(),
            torch._C._storage_Use_Count(grad.untyped_storage()._cdata))


@functools.cache
def sole_refs() -> SoleRefs:
    """What :func:`sole_owner` compares with, measured once per process on unshared gradients.

    Where torch lacks the private counters, ``(None, None)``: nothing is ever masked in place.
    """
    found: dict[bool, tuple[int, int, int, int]] = {}

    def probe(grad: torch.Tensor) -> None:  # called as the sparsifier's hook is
        found.setdefault(grad._base is not None, ref_counts(grad, sys.getrefcount(grad)))

    try:
        with torch.enable_grad():
            for forward in (lambda w: w * 2.0, lambda w: nn.functional.linear(torch.ones(3, 2), w)):
                w = torch.zeros(2, 2, requires_grad=True)
                w.register_hook(probe)
                forward(w).sum().backward()
    except (AttributeError, RuntimeError):
        found.clear()
    return (found.get(False), found.get(True))


def sole_owner(grad: torch.Tensor, python_refs: int, refs: SoleRefs) -> bool:
    """Whether a tensor hook may modify ``grad`` in place: nothing but the engine and the hook refers to it.

    Args:
        grad: the gradient the hook received.
        python_refs: ``sys.getrefcount(grad)`` taken in the hook, in a frame holding ``grad`` as
            the probe of :func:`sole_refs` does (one local reference).
        refs: :func:`sole_refs`.

    Returns:
        False for a gradient that is part of a graph (double backward), that anything else refers
        to, or when the counts are unavailable; then the hook returns a masked copy instead.
    """
    try:
        if grad.requires_grad:  # part of a graph (double backward): leave it alone
            return False
        base = grad._base
        sole = refs[base is not None]
        # In order of cost; the same counts as `ref_counts` (with `base` held here as there).
        return (sole is not None and python_refs <= sole[0] and grad._use_count() <= sole[1]
                and (base is None or base._use_count() <= sole[2])
                and torch._C._storage_Use_Count(grad.untyped_storage()._cdata) <= sole[3])
    except (AttributeError, RuntimeError):
        return False
