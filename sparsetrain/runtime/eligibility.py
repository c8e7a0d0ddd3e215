"""Which Linear layers can run 2:4: the weight's pattern, dtype, dims and device.

A weight is 2:4 when every group of 4 consecutive weights along the input dimension (each row's
columns ``4g .. 4g+3``) holds at most 2 nonzeros. NaN counts as nonzero; ``-0.0`` as zero.

Legend: O output features, I input features, G groups of 4 per row.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DIM_MULTIPLE", "SPARSE_DTYPES", "first_bad_group", "ineligible_reason", "is_24"]

#: Both dims of a 2:4 weight must be multiples of this (cuSPARSELt's minimum for bf16/fp16, the
#: ``sparse_min_rows`` / ``sparse_min_cols`` torch checks in ``to_sparse_semi_structured``).
DIM_MULTIPLE = 16
#: The dtypes the 2:4 kernels take for a Linear's weight and input.
SPARSE_DTYPES = (torch.bfloat16, torch.float16)


def _counts_OG(weight_OI: torch.Tensor) -> torch.Tensor:
    out_features, in_features = weight_OI.shape
    return (weight_OI != 0).reshape(out_features, in_features // 4, 4).sum(-1)


def _check_weight(weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    return weight


def is_24(weight: torch.Tensor) -> bool:
    """True when ``weight`` ``[O, I]`` has at most 2 nonzeros in every group of 4 along ``I``.

    ``I`` must be a multiple of 4 (else False).

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: ``weight`` is not 2-D.
    """
    weight = _check_weight(weight)
    if weight.shape[1] % 4:
        return False
    if weight.numel() == 0:
        return True
    return bool((_counts_OG(weight) <= 2).all())


def first_bad_group(weight: torch.Tensor) -> tuple[int, int] | None:
    """``(row, group)`` of the first group (row-major order) with more than 2 nonzeros, or None.

    Group ``g`` of a row covers columns ``4g .. 4g+3``.

    Raises:
        TypeError: ``weight`` is not a tensor.
        ValueError: ``weight`` is not 2-D or its second dim is not a multiple of 4.
    """
    weight = _check_weight(weight)
    if weight.shape[1] % 4:
        raise ValueError(f"`weight` needs in_features divisible by 4, got shape {tuple(weight.shape)}")
    bad = (_counts_OG(weight) > 2).flatten().nonzero()
    if bad.numel() == 0:
        return None
    flat = int(bad[0, 0])
    groups = weight.shape[1] // 4
    return flat // groups, flat % groups


def ineligible_reason(layer: nn.Module, *, needs_cuda: bool) -> str | None:
    """Why ``layer`` cannot become a 2:4 layer, or None when it can.

    Checked in order: exactly ``nn.Linear`` (subclasses such as MultiheadAttention's ``out_proj``,
    whose weight the parent reads directly, and parametrized layers are left alone), dtype in
    :data:`SPARSE_DTYPES`, both dims multiples of :data:`DIM_MULTIPLE`, on CUDA (when
    ``needs_cuda``), and a 2:4 weight.
    """
    if type(layer) is not nn.Linear:
        return f"{type(layer).__name__} is not a plain nn.Linear"
    weight = layer.weight
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} (2:4 needs bfloat16 or float16)"
    out_features, in_features = weight.shape
    if out_features % DIM_MULTIPLE or in_features % DIM_MULTIPLE:
        return f"shape {out_features}x{in_features} (both dims must be multiples of {DIM_MULTIPLE})"
    if needs_cuda and weight.device.type != "cuda":
        return f"on {weight.device} (cuSPARSELt needs CUDA)"
    if weight.device.type == "meta":
        return "on the meta device (no values to check)"
    with torch.no_grad():
        bad = first_bad_group(weight.detach())
    if bad is not None:
        row, group = bad
        return f"not 2:4 (row {row}, columns {4 * group}..{4 * group + 3} hold more than 2 nonzeros)"
    return None
