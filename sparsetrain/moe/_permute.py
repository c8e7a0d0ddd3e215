"""Row gathers whose backward is a gather too (deterministic: no scatter-add).

Legend: T tokens, D width, K experts per token, N = T*K assignment rows, S rows sorted by expert.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["_Dispatch", "_Permute"]


class _Dispatch(torch.autograd.Function):
    """``x_TD[order_N // K]`` whose backward gathers (``g[inv].view(T, K, D).sum(1)``) instead of scatter-adding."""

    @staticmethod
    def forward(ctx: Any, x_TD: torch.Tensor, order_N: torch.Tensor, inv_N: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv_N)
        ctx.k = k
        return x_TD[order_N // k]

    @staticmethod
    def backward(ctx: Any, g_SD: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inv_N,) = ctx.saved_tensors
        g_ND = g_SD[inv_N]
        return g_ND.view(-1, ctx.k, g_ND.shape[-1]).sum(dim=1), None, None, None


class _Permute(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` whose inverse is ``inv``; backward ``g[inv]``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x[perm]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        return g[inv], None, None
