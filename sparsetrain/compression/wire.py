"""The sparse message: one flat byte buffer per bucket and rank, exchanged by one all-gather.

Layout of one rank's segment (every rank's segment has the same size, so a plain
``all_gather_into_tensor`` of ``uint8`` buffers carries it; all offsets are 4-byte aligned)::

    int32   flag          1 when this rank's gradient was finite, else 0
    float32 scales[E]     one value scale per sparse tensor (1 unless fp16)
    int32   indices[K]    positions in the flattened bucket
    float32 dense[D]      tensors sent whole (1-D, small, or priced out by the cost rule)
    VALUE   values[K]     the selected values, VALUE = float32 | float16 | bfloat16
    (zero padding to a multiple of 4 bytes)

``K`` is the sum of the per-tensor ``k`` (fixed by the density, identical on every rank); a
rank that selected fewer pads with index 0 and value 0, which adds nothing when decoded.
fp16 values are divided by a per-tensor power of two chosen so that the tensor's largest
magnitude lands in ``[2**14, 2**15)``: no finite value overflows fp16 in transit and scaling
itself is exact (DGC sends fp16 values unscaled; a loss-scaled gradient can exceed fp16's
65504). The scale is per tensor, not per message, so the result does not depend on how DDP
happens to group tensors into buckets.

Legend: E sparse tensors, K sparse slots, D dense elements, W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DTYPES", "SegmentLayout", "decode_values", "encode_segments", "encode_values", "pack", "unpack"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SegmentLayout:
    """Byte layout of one rank's segment.

    Args:
        n_sparse: K, sparse slots (indices and values).
        n_dense: D, elements sent whole as float32.
        n_scales: E, sparse tensors (one value scale each).
        value_dtype: dtype of the sparse values on the wire.
    """

    n_sparse: int
    n_dense: int
    n_scales: int = 1
    value_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if min(self.n_sparse, self.n_dense, self.n_scales) < 0:
            raise ValueError(
                f"`n_sparse`, `n_dense` and `n_scales` must be >= 0, got "
                f"{self.n_sparse}, {self.n_dense}, {self.n_scales}"
            )
        if self.value_dtype not in DTYPES.values():
            raise ValueError(f"`value_dtype` must be one of {list(DTYPES.values())}, got {self.value_dtype}")

    @property
    def value_bytes(self) -> int:
        return torch.empty((), dtype=self.value_dtype).element_size()

    @property
    def header_words(self) -> int:
        return 1 + self.n_scales

    @property
    def values_offset(self) -> int:
        return 4 * (self.header_words + self.n_sparse + self.n_dense)

    @property
    def nbytes(self) -> int:
        raw = self.values_offset + self.value_bytes * self.n_sparse
        return (raw + 3) // 4 * 4


def pack(
    layout: SegmentLayout,
    *,
    finite: torch.Tensor,
    scales_E: torch.Tensor,
    indices_K: torch.Tensor,
    values_K: torch.Tensor,
    dense_D: torch.Tensor,
) -> torch.Tensor:
    """Write one segment. ``values_K`` must already be in ``layout.value_dtype`` (see :func:`encode_values`).

    Args:
        layout: the segment layout.
        finite: 0-d bool tensor, False when this rank's gradient had a non-finite entry.
        scales_E: float32 value scales, one per sparse tensor (1 unless fp16).
        indices_K: int32 or int64 positions, K of them.
        values_K: K values.
        dense_D: D float32 values.

    Returns:
        A ``uint8`` tensor of ``layout.nbytes`` bytes on the values' device.
    """
    if indices_K.numel() != layout.n_sparse or values_K.numel() != layout.n_sparse:
        raise ValueError(
            f"`indices_K`/`values_K` must have {layout.n_sparse} elements, got "
            f"{indices_K.numel()}/{values_K.numel()}"
        )
    if dense_D.numel() != layout.n_dense:
        raise ValueError(f"`dense_D` must have {layout.n_dense} elements, got {dense_D.numel()}")
    if scales_E.numel() != layout.n_scales:
        raise ValueError(f"`scales_E` must have {layout.n_scales} elements, got {scales_E.numel()}")
    device = values_K.device if layout.n_sparse else dense_D.device
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    h = layout.header_words
    ints = buf[: 4 * (h + layout.n_sparse)].view(torch.int32)
    ints[0].copy_(finite)
    ints[1:h].view(torch.float32).copy_(scales_E)
    ints[h:].copy_(indices_K)
    buf[4 * (h + layout.n_sparse) : layout.values_offset].view(torch.float32).copy_(dense_D)
    end = layout.values_offset + layout.value_bytes * layout.n_sparse
    buf[layout.values_offset : end].view(layout.value_dtype).copy_(values_K)
    return buf


def unpack(
    gathered: torch.Tensor, layout: SegmentLayout, world_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split an all-gathered buffer of ``world_size`` segments into views.

    Returns:
        ``(finite_W, scales_WE, indices_WK, values_WK, dense_WD)``: bool, float32, int32, value
        dtype, float32; views into ``gathered`` (no copies).
    """
    if gathered.dtype != torch.uint8 or gathered.numel() != world_size * layout.nbytes:
        raise ValueError(
            f"`gathered` must be uint8 with {world_size * layout.nbytes} bytes, got "
            f"{gathered.dtype} with {gathered.numel()}"
        )
    seg_WB = gathered.view(world_size, layout.nbytes)
    k, d, h = layout.n_sparse, layout.n_dense, layout.header_words
    ints_WI = seg_WB[:, : 4 * (h + k)].view(torch.int32)
    finite_W = ints_WI[:, 0] != 0
    scales_WE = ints_WI[:, 1:h].view(torch.float32)
    indices_WK = ints_WI[:, h:]
    dense_WD = seg_WB[:, 4 * (h + k) : layout.values_offset].view(torch.float32)
    values_WK = seg_WB[:, layout.values_offset : layout.values_offset + layout.value_bytes * k].view(
        layout.value_dtype
    )
    return finite_W, scales_WE, indices_WK, values_WK, dense_WD.reshape(world_size, d)


def encode_values(values_K: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast one tensor's float32 values for the wire; fp16 is first divided by a power-of-two scale.

    Returns:
        ``(wire_values, scale)``; ``decode_values(wire_values, scale)`` gives back the values
        up to the wire dtype's rounding.
    """
    one = torch.ones((), dtype=torch.float32, device=values_K.device)
    if dtype == torch.float32:
        return values_K, one
    if dtype == torch.bfloat16:
        return values_K.to(torch.bfloat16), one
    if dtype != torch.float16:
        raise ValueError(f"`dtype` must be float32, float16 or bfloat16, got {dtype}")
    amax = values_K.abs().amax() if values_K.numel() else torch.zeros_like(one)
    finite_pos = torch.isfinite(amax) & (amax > 0)
    # amax = m * 2**e with m in [0.5, 1): dividing by 2**(e - 15) puts amax in [2**14, 2**15).
    _, exp = torch.frexp(torch.where(finite_pos, amax, one))
    scale = torch.ldexp(one, (exp - 15).to(torch.int32))
    scale = torch.where(finite_pos, scale, one)
    return (values_K / scale).to(torch.float16), scale


def decode_values(values_K: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_values`, as float32."""
    return values_K.float() * scale


def encode_segments(
    values_K: torch.Tensor, dtype: torch.dtype, segment_K: torch.Tensor, n_segments: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encode_values` for several tensors' values at once, one scale per tensor.

    Args:
        values_K: float32 values of all sparse tensors of a message, tensor after tensor.
        dtype: wire dtype.
        segment_K: int64, the tensor (0..E-1) each value belongs to.
        n_segments: E.

    Returns:
        ``(wire_K, scales_E, decoded_K)``: the values as sent, the per-tensor scales, and the
        values the receivers will decode (float32).
    """
    ones = torch.ones(n_segments, dtype=torch.float32, device=values_K.device)
    if dtype == torch.float32:
        return values_K, ones, values_K
    if dtype == torch.bfloat16:
        wire = values_K.to(torch.bfloat16)
        return wire, ones, wire.float()
    if dtype != torch.float16:
        raise ValueError(f"`dtype` must be float32, float16 or bfloat16, got {dtype}")
    amax_E = torch.zeros_like(ones).scatter_reduce_(0, segment_K, values_K.abs(), "amax")
    finite_pos = torch.isfinite(amax_E) & (amax_E > 0)
    _, exp = torch.frexp(torch.where(finite_pos, amax_E, ones))
    scales_E = torch.where(finite_pos, torch.ldexp(ones, (exp - 15).to(torch.int32)), ones)
    scale_K = scales_E.index_select(0, segment_K)
    wire = (values_K / scale_K).to(torch.float16)
    return wire, scales_E, wire.float() * scale_K
