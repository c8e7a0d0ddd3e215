"""The compressed-tensors ``sparse-24-bitmask`` layout of one 2:4 weight (pure functions over tensors).

A 2-D weight ``W`` [rows, cols] whose every group of 4 consecutive entries along a row (the GEMM
reduction dim of an ``nn.Linear`` weight) holds at most 2 nonzeros is stored as three tensors:

- ``compressed`` [rows, cols/2], ``W``'s dtype: the 2 kept entries of every group, in row order;
- ``bitmask`` uint8 [rows, ceil(cols/8)]: the kept positions, ``numpy.packbits(mask, axis=-1,
  bitorder="little")`` per row (bit ``j % 8`` of byte ``j // 8`` is column ``j``; padding bits 0);
- ``shape`` int64 [[rows], [cols]].

Exactly 2 positions per group are marked kept: the nonzeros, then (in a group with fewer) the
first zero positions, so ``compressed`` is always [rows, cols/2]. ``-0.0`` is stored as ``+0.0``.
This is the layout of compressed-tensors 0.12.2's ``Sparse24BitMaskCompressor``.
"""

from __future__ import annotations

import torch

__all__ = ["check_24", "compress_24", "decompress_24", "first_bad_group", "pack_bits", "unpack_bits"]

_GROUP = 4
_KEPT = 2


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``numpy.packbits(mask, axis=-1, bitorder="little")`` of a 2-D bool tensor, as uint8."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"`mask` must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    rows, cols = mask.shape
    nbytes = (cols + 7) // 8
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    bits = padded.view(rows, nbytes, 8)
    out = bits[..., 0].clone()
    for j in range(1, 8):
        out |= bits[..., j] << j
    return out


def unpack_bits(bitmask: torch.Tensor, cols: int) -> tuple[torch.Tensor, bool]:
    """The bool mask [rows, cols] of a packed ``bitmask`` [rows, ceil(cols/8)], and whether every
    padding bit (past ``cols``) is 0."""
    rows, nbytes = bitmask.shape
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, nbytes * 8)
    return bits[:, :cols].contiguous(), not bool(bits[:, cols:].any())


def first_bad_group(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """``(row, group, nonzeros)`` of the first group of 4 along the last dim holding more than 2
    nonzeros (NaN counts as nonzero), or None when ``weight`` is 2:4."""
    rows, cols = weight.shape
    counts = (weight != 0).reshape(rows, cols // _GROUP, _GROUP).sum(-1)
    bad = (counts > _KEPT).nonzero()
    if bad.numel() == 0:
        return None
    r, g = (int(v) for v in bad[0])
    return r, g, int(counts[r, g])


def check_24(weight: torch.Tensor, name: str) -> None:
    """Raise unless ``weight`` (2-D, cols a multiple of 4) has at most 2 nonzeros per group of 4.

    Raises:
        ValueError: naming ``name``, the first bad group (row, columns) and its values.
    """
    if weight.dim() != 2 or weight.shape[1] % _GROUP:
        raise ValueError(f"{name}: a 2:4 weight must be 2-D with a multiple of 4 columns, "
                         f"got shape {tuple(weight.shape)}")
    bad = first_bad_group(weight)
    if bad is not None:
        r, g, k = bad
        values = weight[r, g * _GROUP:(g + 1) * _GROUP].tolist()
        raise ValueError(f"{name} is not 2:4: row {r}, group {g} (columns {g * _GROUP}-{g * _GROUP + 3}) holds "
                         f"{k} nonzeros {values}; 2:4 allows at most 2 per group of 4")


def compress_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(compressed, bitmask, shape)`` of a 2:4 weight (see the module docstring).

    Raises:
        ValueError: ``weight`` is not 2-D with a multiple of 4 columns, or some group has more
            than 2 nonzeros (naming ``name`` and the group).
    """
    weight = weight.detach() + 0  # a copy; -0.0 + 0 is +0.0 (an int 0 keeps the dtype)
    check_24(weight, name)
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // _GROUP, _GROUP)
    # the nonzeros, then as many of the lowest zero positions as the group needs to keep 2
    zero = ~nonzero
    wanted = _KEPT - nonzero.sum(-1, keepdim=True, dtype=torch.int8)
    mask = nonzero | (zero & (zero.cumsum(-1, dtype=torch.int8) <= wanted))
    compressed = weight.reshape(rows, cols // _GROUP, _GROUP).gather(-1, _kept_index(mask)).reshape(rows, cols // 2)
    mask = mask.reshape(rows, cols)
    shape = torch.tensor([[rows], [cols]], dtype=torch.int64)
    return compressed, pack_bits(mask), shape


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int],
                  name: str = "weight") -> torch.Tensor:
    """The dense weight [rows, cols] of a ``sparse-24-bitmask`` entry.

    Raises:
        ValueError: naming ``name``: tensors of inconsistent shapes or dtypes, padding bits set,
            a group of 4 with more than 2 kept entries, or a row with another number of kept
            entries than ``compressed`` holds.
    """
    rows, cols = shape
    if cols % _GROUP or rows < 0:
        raise ValueError(f"{name}.shape: {[rows, cols]} is not a 2:4 shape (columns must be a multiple of 4)")
    if tuple(compressed.shape) != (rows, cols // 2):
        raise ValueError(f"{name}.compressed has shape {tuple(compressed.shape)}, but {name}.shape "
                         f"{[rows, cols]} needs {(rows, cols // 2)}")
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"{name}.bitmask must be uint8 of shape {(rows, (cols + 7) // 8)}, got "
                         f"{bitmask.dtype} of shape {tuple(bitmask.shape)}")
    mask, clean = unpack_bits(bitmask, cols)
    if not clean:
        raise ValueError(f"{name}.bitmask has bits set past column {cols} (the padding must be 0)")
    counts = mask.reshape(rows, cols // _GROUP, _GROUP).sum(-1)
    bad = (counts > _KEPT).nonzero()
    if bad.numel():
        r, g = (int(v) for v in bad[0])
        raise ValueError(f"{name}.bitmask keeps {int(counts[r, g])} entries in row {r}, group {g} (columns "
                         f"{g * _GROUP}-{g * _GROUP + 3}); 2:4 allows at most 2 nonzeros per group of 4")
    per_row = mask.sum(-1)
    short = (per_row != cols // 2).nonzero()
    if short.numel():
        r = int(short[0, 0])
        raise ValueError(f"{name}.bitmask keeps {int(per_row[r])} entries in row {r}, but {name}.compressed "
                         f"holds {cols // 2} per row")
    dense = torch.zeros(rows, cols // _GROUP, _GROUP, dtype=compressed.dtype, device=compressed.device)
    index = _kept_index(mask.reshape(rows, cols // _GROUP, _GROUP))
    return dense.scatter_(-1, index, compressed.reshape(rows, cols // _GROUP, _KEPT)).reshape(rows, cols)


#: group bit pattern (bit j: position j kept) -> its two kept positions (patterns with 2 bits set).
_PAIRS = torch.tensor([[j for j in range(_GROUP) if code >> j & 1] if bin(code).count("1") == _KEPT else [0, 0]
                       for code in range(1 << _GROUP)], dtype=torch.int64)


def _kept_index(mask_RG4: torch.Tensor) -> torch.Tensor:
    """The two kept positions [R, G, 2] (ascending) of a mask [R, G, 4] keeping exactly 2 per group."""
    b = mask_RG4.to(torch.uint8)
    code = b[..., 0] | (b[..., 1] << 1) | (b[..., 2] << 2) | (b[..., 3] << 3)
    return torch.nn.functional.embedding(code.long(), _PAIRS.to(code.device))
