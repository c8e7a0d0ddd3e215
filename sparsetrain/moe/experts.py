"""Experts stored as stacked ``[E, ...]`` weights, computed with grouped GEMMs over expert-sorted rows.

Legend: N rows (token-expert assignments, sorted by expert), D model width, F expert hidden width,
E experts. ``offs_E`` holds the cumulative row ends of each expert's group (int32); rows past
``offs_E[-1]`` belong to no expert and their output is unspecified (the layer masks them out).

One seam, :func:`_grouped_mm`, picks the kernel: ``torch._grouped_mm`` (CUTLASS, no host sync) for
bf16 CUDA tensors on sm90 and newer with 16-byte aligned widths, else a loop over the experts that
reads the group ends on the host once (the correct fallback, CPU included).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedExperts"]


def mark_stacked(p: nn.Parameter) -> nn.Parameter:
    """Mark an ``[E, ...]`` expert parameter so that gradient compression selects per expert slice
    (``sparsetrain.compression.dgc.STACKED_ATTR``: each ``p[e]`` is compressed as a tensor of its own)."""
    p._sparsetrain_stacked = True
    return p


def _use_grouped_kernel(x_ND: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    if not (x_ND.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if x_ND.dtype != torch.bfloat16 or w_EDF.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x_ND.device)[0] < 9:
        return False
    return x_ND.shape[-1] % 8 == 0 and w_EDF.shape[-1] % 8 == 0


def _loop_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """The reference: ``x[rows of e] @ w[e]`` for each expert e; rows past the last group are zero."""
    ends = offs_E.tolist()  # the one host read of this path
    pieces, start = [], 0
    for e, end in enumerate(ends):
        pieces.append(x_ND[start:end] @ w_EDF[e])
        start = end
    tail = x_ND.shape[0] - start
    if tail:
        pieces.append(x_ND.new_zeros(tail, w_EDF.shape[-1]))
    return torch.cat(pieces, dim=0)


def _grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Row groups of ``x_ND`` times their expert's ``w_EDF[e]`` -> ``[N, F]`` (the kernel seam)."""
    if _use_grouped_kernel(x_ND, w_EDF):
        return torch._grouped_mm(x_ND, w_EDF, offs=offs_E)
    return _loop_mm(x_ND, w_EDF, offs_E)


class GroupedExperts(nn.Module):
    """E MLP experts, ``w1_EFD`` (in), ``w2_EDF`` (out) and for SwiGLU ``w3_EFD`` (gate).

    GELU: ``y = w2 gelu(w1 x + b1) + b2``; SwiGLU (Shazeer 2020): ``y = w2 (silu(w1 x) * w3 x)``.
    Each expert is initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)).

    Args:
        num_experts: E.
        d_model: D.
        d_hidden: F.
        activation: ``"swiglu"`` or ``"gelu"``.
        bias: learnable biases ``b1_EF`` / ``b2_ED`` (needed to upcycle MLPs that have biases).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int,
                 activation: Literal["swiglu", "gelu"] = "swiglu", bias: bool = False) -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"`activation` must be 'swiglu' or 'gelu', got {activation!r}")
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        E, D, Fh = num_experts, d_model, d_hidden
        self.w1_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.w3_EFD = nn.Parameter(torch.empty(E, Fh, D)) if activation == "swiglu" else None
        self.b1_EF = nn.Parameter(torch.empty(E, Fh)) if bias else None
        self.b2_ED = nn.Parameter(torch.empty(E, D)) if bias else None
        for p in self.parameters():
            mark_stacked(p)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w, fan_in in ((self.w1_EFD, self.d_model), (self.w3_EFD, self.d_model), (self.w2_EDF, self.d_hidden),
                          (self.b1_EF, self.d_model), (self.b2_ED, self.d_hidden)):
            if w is not None:
                bound = 1.0 / math.sqrt(fan_in)
                w.uniform_(-bound, bound)

    def forward(self, x_ND: torch.Tensor, offs_E: torch.Tensor, expert_N: torch.Tensor | None = None) -> torch.Tensor:
        """Apply expert e to its row group. ``expert_N`` (each row's expert) is needed only with biases."""
        if torch.is_autocast_enabled(x_ND.device.type):  # compute in autocast's dtype (bf16: the grouped kernel)
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        dtype = x_ND.dtype
        w1 = self.w1_EFD.to(dtype).transpose(-2, -1)
        h_NF = _grouped_mm(x_ND, w1, offs_E)
        if self.b1_EF is not None:
            h_NF = h_NF + self._row_bias(self.b1_EF, expert_N, dtype)
        if self.w3_EFD is not None:
            h_NF = F.silu(h_NF) * _grouped_mm(x_ND, self.w3_EFD.to(dtype).transpose(-2, -1), offs_E)
        else:
            h_NF = F.gelu(h_NF)
        y_ND = _grouped_mm(h_NF, self.w2_EDF.to(dtype).transpose(-2, -1), offs_E)
        if self.b2_ED is not None:
            y_ND = y_ND + self._row_bias(self.b2_ED, expert_N, dtype)
        return y_ND

    def _row_bias(self, b_EX: torch.Tensor, expert_N: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if expert_N is None:
            raise ValueError("`expert_N` is required when the experts have biases")
        # rows past the last group carry expert id E: give them a zero bias row
        padded = torch.cat([b_EX, b_EX.new_zeros(1, b_EX.shape[1])]).to(dtype)
        return padded[expert_N]

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
                f"activation={self.activation!r}, bias={self.b1_EF is not None}")
