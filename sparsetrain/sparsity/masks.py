"""Which weights get a mask, and the exact-count mask primitives the methods are built from.

Everything here is a pure function: it reads tensors or a module tree and returns new
tensors or names; nothing registers buffers or hooks (that is :mod:`.dynamic`).

Masks are ``torch.bool`` tensors of the weight's shape; ``True`` marks an active weight.
Selections are exact: a mask built for ``k`` active weights has exactly ``k`` ``True``
entries, whatever the ties in the scores (ties are broken by ``torch.topk``, which is
deterministic for a given input on a given device type).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "grow_mask",
    "keep_largest",
    "random_mask",
    "select_modules",
]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
) -> list[str]:
    """Names of the modules whose ``weight`` will be sparsified, in registration order.

    A module is a candidate when it is an instance of ``module_types`` with a ``weight``
    parameter of at least 2 dimensions. ``include`` (if given) keeps the candidates whose
    name matches one of its globs (``fnmatch``: ``"blocks.*.mlp.*"``); ``exclude`` then
    removes the matching ones. ``keep_first_dense`` / ``keep_last_dense`` finally drop the
    first / last remaining module in ``model.named_modules()`` order (registration order,
    which is usually but not necessarily execution order).

    Args:
        model: the model.
        include: globs over module names; ``None`` keeps every candidate.
        exclude: globs over module names to leave dense.
        module_types: module classes that can be sparsified.
        keep_first_dense: leave the first selected module dense.
        keep_last_dense: leave the last selected module dense.

    Returns:
        The selected module names.

    Raises:
        ValueError: an ``include`` or ``exclude`` pattern matches no candidate module, or
            nothing is left to sparsify.
    """
    candidates = [
        name
        for name, m in model.named_modules()
        if isinstance(m, tuple(module_types))
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() >= 2
    ]
    for arg, patterns in (("include", include or ()), ("exclude", exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in candidates):
                shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
                raise ValueError(f"`{arg}` pattern {p!r} matches no sparsifiable module; candidates: {shown}")
    selected = [n for n in candidates if (include is None or _matches(n, include)) and not _matches(n, exclude)]
    if keep_first_dense and selected:
        selected = selected[1:]
    if keep_last_dense and selected:
        selected = selected[:-1]
    if not selected:
        raise ValueError(
            "no module left to sparsify: check `include`, `exclude`, `keep_first_dense`, `keep_last_dense` "
            f"(candidates: {', '.join(candidates) or 'none'})"
        )
    return selected


def random_mask(
    shape: Sequence[int], n_active: int, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """A mask with exactly ``n_active`` ``True`` entries at uniformly random positions.

    The positions are drawn on the CPU from ``generator`` (so every rank seeded alike draws
    the same mask, whatever its device) and the mask is then moved to ``device``.

    Raises:
        ValueError: ``n_active`` outside [0, numel].
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    if not 0 <= n_active <= numel:
        raise ValueError(f"`n_active` must be in [0, {numel}], got {n_active}")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:n_active]] = True
    return flat.view(*shape).to(device) if device is not None else flat.view(*shape)


def keep_largest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` active positions of ``mask`` with the largest ``scores``.

    Args:
        scores: any real tensor of the mask's shape (NaN counts as smallest).
        mask: bool tensor; only its ``True`` positions can be kept.
        k: how many to keep, in [0, mask.sum()].

    Returns:
        A new bool mask, a subset of ``mask`` with exactly ``k`` ``True`` entries.
    """
    n_active = int(mask.sum())
    if not 0 <= k <= n_active:
        raise ValueError(f"`k` must be in [0, {n_active}] (the active count), got {k}")
    s = scores.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    # Active scores are made finite (NaN lowest), inactive ones -inf: with k <= n_active the
    # top-k can only pick active positions.
    info = torch.finfo(s.dtype)
    s = torch.nan_to_num(s.flatten(), nan=info.min, neginf=info.min, posinf=info.max)
    s = torch.where(mask.flatten(), s, torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    out = torch.zeros_like(mask.flatten())
    if k:
        out[torch.topk(s, k, sorted=False).indices] = True
    return out.view_as(mask)


def grow_mask(scores: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` positions NOT in ``kept`` with the largest ``scores``.

    Args:
        scores: growth scores of the mask's shape (|dense gradient| for RigL, uniform random for SET).
        kept: bool mask of positions that may not be chosen.
        k: how many to grow, in [0, numel - kept.sum()].

    Returns:
        A new bool mask, disjoint from ``kept``, with exactly ``k`` ``True`` entries.
    """
    n_free = kept.numel() - int(kept.sum())
    if not 0 <= k <= n_free:
        raise ValueError(f"`k` must be in [0, {n_free}] (the free positions), got {k}")
    free = ~kept
    return keep_largest(scores, free, k)
