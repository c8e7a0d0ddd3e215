"""N:M training methods: the masked-weight autograd function, its parametrization, the schedules.

Every method runs the forward pass with ``W_eff = W * (mask + (1 - mask) * beta)`` and sends
the gradient straight through to the dense weight ``W``:

- ``ste`` (Bengio et al. 2013): ``beta = 0``; ``dL/dW = dL/dW_eff``.
- ``srste`` (Zhou et al., ICLR 2021, eq. 4): ``beta = 0``;
  ``dL/dW = dL/dW_eff + lambda_W * (1 - mask) * W`` with ``lambda_W = 2e-4``.
- ``mdgf`` (Bambhaniya et al. 2024, "Progressive Gradient Flow for Robust N:M Sparsity
  Training in Transformers", decaying mask): ``beta_t`` decays from 1 to 0, linearly
  ``max(0, 1 - c t)`` or exponentially ``exp(-c t)``; gradient straight through (as in the
  authors' code).
- ``sdgf`` (same paper, structure decay): binary masks whose pattern steps from dense through
  denser N:M ratios to the target, e.g. dense -> 7:8 -> 4:8 -> 2:8 -> 1:8; gradient straight
  through.

The mask itself is computed elsewhere (:func:`sparsetrain.nm.masks.nm_mask`) and handed to the
parametrization, so the optimizer is never touched.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .masks import check_nm, forward_mask

__all__ = ["NMMask", "masked_weight", "mdgf_beta", "sdgf_ladder", "sdgf_pattern"]

METHODS = ("ste", "srste", "mdgf", "sdgf")


class _MaskedWeight(torch.autograd.Function):
    """``W * (mask + (1 - mask) * beta)`` forward; ``g + lambda_w * (1 - mask) * W`` backward.

    Pruned entries are computed with the same ``addcmul`` as :class:`NMMask`'s stored-mask path
    (bit-identical results); ``torch.where`` keeps the other entries, NaN-safe.
    """

    @staticmethod
    def forward(ctx, weight, mask, beta, lambda_w):
        ctx.lambda_w = lambda_w
        if lambda_w:
            ctx.save_for_backward(weight, mask)
        if beta == 0.0:
            # torch.where, not weight * mask: a pruned inf/NaN must not leak into the output (AMP).
            return torch.where(mask, weight, 0.0)
        return torch.where(mask, weight, torch.addcmul(weight, weight, ~mask, value=beta - 1.0))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.lambda_w:
            return grad, None, None, None
        weight, mask = ctx.saved_tensors
        decayed = torch.addcmul(grad, weight, ~mask, value=ctx.lambda_w)
        return torch.where(mask, grad, decayed), None, None, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, beta: float = 0.0,
                  lambda_w: float = 0.0) -> torch.Tensor:
    """The weight a sparse layer computes with, with a straight-through (optionally SR-STE) gradient.

    Forward: ``W * (mask + (1 - mask) * beta)`` (exactly ``where(mask, W, 0)`` when ``beta == 0``).
    Backward: ``dL/dW = dL/dW_eff + lambda_w * (1 - mask) * W`` (Zhou et al. 2021, eq. 4; plain STE
    when ``lambda_w == 0``). ``mask`` gets no gradient.

    Args:
        weight: the dense weight.
        mask: bool tensor of ``weight``'s shape.
        beta: weight kept on pruned entries in the forward pass (MDGF's decaying mask), in [0, 1].
        lambda_w: SR-STE's sparse-refined decay on pruned entries, >= 0.

    Raises:
        ValueError: ``mask`` is not a bool tensor of ``weight``'s shape, ``beta`` outside [0, 1],
            or ``lambda_w`` < 0.
    """
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"`mask` must be a bool tensor of shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta}")
    if lambda_w < 0:
        raise ValueError(f"`lambda_w` must be >= 0, got {lambda_w}")
    return _MaskedWeight.apply(weight, mask, float(beta), float(lambda_w))


class NMMask(nn.Module):
    """Parametrization of a layer's ``weight`` that computes with its N:M-masked version.

    Registered with ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", ...)``:
    the dense weight stays the trained parameter (``layer.parametrizations.weight.original``),
    the forward pass sees ``W * (mask + (1 - mask) * beta)`` with the gradient straight through to
    ``W``, and :meth:`decay_gradient` (a hook on ``W`` that the owner registers) adds SR-STE's
    ``lambda_w * (1 - mask) * W``. The mask is a plain attribute, not a buffer, so DDP does not
    broadcast it every step; the owner (:class:`~sparsetrain.nm.NMSparsifier`) recomputes it,
    checks it is equal on all ranks and checkpoints it.

    With a stored mask the forward pass is one ``torch.addcmul(W, W.detach(), pruned, value=beta - 1)``
    (its backward passes the gradient through untouched, in C++) and SR-STE's term is one
    ``addcmul`` in the hook: no Python runs in the backward pass beyond that hook. This is what
    :func:`masked_weight` computes, except where ``W`` is not finite: a NaN or inf weight gives NaN
    in the forward weight (:func:`masked_weight` keeps a pruned NaN out). N:M masks rank NaN and inf
    largest and keep them, so this differs only for a non-finite weight pruned by a stale mask.

    Attributes:
        mask: bool mask of the weight's shape, or None for a dense stage (identity).
        pruned: ``~mask``, kept beside it (set both with :meth:`set_mask`).
        beta: MDGF's weight on pruned entries (0 = hard mask).
        lambda_w: SR-STE's decay, already divided by the gradient-accumulation factor.
        nm: ``(n, m)`` to compute the mask from the weight in every forward pass instead of
            using ``mask`` (``NMConfig.masks_in_forward``; inside ``torch.compile`` it fuses into
            the kernel that reads the weight; SR-STE's term is then part of that pass's backward,
            not of the hook); None uses ``mask``.
    """

    def __init__(self, mask: torch.Tensor | None, beta: float = 0.0, lambda_w: float = 0.0,
                 nm: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.set_mask(mask)
        self.beta = beta
        self.lambda_w = lambda_w
        self.nm = nm

    def set_mask(self, mask: torch.Tensor | None, pruned: torch.Tensor | None = None) -> None:
        """Install ``mask`` (None: dense) and its complement ``pruned`` (computed when not given)."""
        # Plain attributes (neither parameters nor buffers), set past nn.Module.__setattr__'s checks:
        # this runs for every layer at every mask update.
        self.__dict__["mask"] = mask
        self.__dict__["pruned"] = None if mask is None else (~mask if pruned is None else pruned)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.nm is not None:
            return _MaskedWeight.apply(weight, forward_mask(weight, *self.nm), self.beta, self.lambda_w)
        pruned = self.pruned
        if pruned is None:
            return weight
        if pruned.get_device() != weight.get_device():  # the model was moved after the mask was computed
            self.set_mask(self.mask.to(weight.device))
            pruned = self.pruned
        return torch.addcmul(weight, weight.detach(), pruned, value=self.beta - 1.0)

    def decay_gradient(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """SR-STE's term for a gradient hook on the dense ``weight``: ``grad + lambda_w * pruned * weight``
        (None, leaving ``grad`` as it is, without ``lambda_w``, without a mask, or with ``nm``)."""
        pruned = self.pruned
        if not self.lambda_w or self.nm is not None or pruned is None:
            return None
        if pruned.get_device() != grad.get_device():
            pruned = pruned.to(grad.device)
        return torch.addcmul(grad, weight.detach(), pruned, value=self.lambda_w)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lambda_w={self.lambda_w}, dense={self.mask is None}"


def mdgf_beta(step: int, decay_steps: int, decay: Literal["linear", "exp"] = "linear") -> float:
    """MDGF's decaying-mask factor ``beta_t`` (Bambhaniya et al. 2024, section 4.1).

    ``linear``: ``beta_t = max(0, 1 - c t)`` with ``c = 1 / decay_steps``.
    ``exp``: ``beta_t = exp(-c t)`` with ``c = ln(1000) / decay_steps`` (``beta = 1e-3`` there).
    Both are 0 from ``decay_steps`` on, so the end of training runs on the hard mask.

    Raises:
        ValueError: ``step`` < 0, ``decay_steps`` < 1, or unknown ``decay``.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}")
    if decay_steps < 1:
        raise ValueError(f"`decay_steps` must be >= 1, got {decay_steps}")
    if decay not in ("linear", "exp"):
        raise ValueError(f"`decay` must be 'linear' or 'exp', got {decay!r}")
    if step >= decay_steps:
        return 0.0
    if decay == "linear":
        return max(0.0, 1.0 - step / decay_steps)
    return math.exp(-math.log(1000.0) * step / decay_steps)


def sdgf_ladder(n: int, m: int) -> list[tuple[int, int]]:
    """SDGF's intermediate patterns from dense to ``n:m`` ("sparsify" order of the paper's code).

    ``(m-1):m``, then ``m/2:m``, ``m/4:m``, ... while still denser than the target; e.g. 1:8 ->
    ``[(7, 8), (4, 8), (2, 8)]``, 2:4 -> ``[(3, 4)]``, 1:2 -> ``[]``. The target is not included.
    """
    check_nm(n, m)
    ladder = [(m - 1, m)] if m - 1 > n else []
    k = m // 2
    while k > n:
        if (k, m) not in ladder:
            ladder.append((k, m))
        k //= 2
    return ladder


def sdgf_pattern(step: int, target: tuple[int, int], ladder: list[tuple[int, int]],
                 decay_steps: int) -> tuple[int, int] | None:
    """The N:M pattern SDGF trains with at ``step``; None for the initial dense stage.

    ``[0, decay_steps)`` is split into ``len(ladder) + 1`` equal stages: dense, then each ladder
    pattern in order; the target pattern holds from ``decay_steps`` on.

    Raises:
        ValueError: ``step`` < 0 or ``decay_steps`` < 1.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}")
    if decay_steps < 1:
        raise ValueError(f"`decay_steps` must be >= 1, got {decay_steps}")
    if step >= decay_steps:
        return tuple(target)
    stage = step * (len(ladder) + 1) // decay_steps
    return None if stage == 0 else tuple(ladder[stage - 1])
