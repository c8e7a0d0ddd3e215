"""safetensors files written tensor by tensor, their shards and index, and a checked header reader.

The writer lays out the header from names, dtypes and shapes alone, then streams each tensor's
bytes as it is produced, so no more than one tensor (one 2:4 weight's three entries) is built at a
time, and returns each entry's SHA-256. The reader parses a header and checks that the file holds
every byte the header promises before any tensor is read. The file layout is safetensors'
(8-byte little-endian header length, a JSON header, the data), read back with ``safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["INDEX_NAME", "SINGLE_NAME", "DTYPES", "Entry", "plan_shards", "read_header", "sha256_range",
           "shard_name", "write_safetensors"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

#: torch dtype -> safetensors dtype code.
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
CODES = {code: dtype for dtype, code in DTYPES.items()}

#: ``(name, dtype, shape)`` of one stored tensor.
Entry = tuple[str, torch.dtype, tuple[int, ...]]


def nbytes(entry: Entry) -> int:
    _, dtype, shape = entry
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def shard_name(i: int, count: int) -> str:
    """``model-00001-of-00003.safetensors`` (the Hugging Face naming), or ``model.safetensors`` alone."""
    return SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(groups: Sequence[Sequence[Entry]], max_shard_bytes: int) -> list[list[int]]:
    """Split ``groups`` (entries that stay in one file, e.g. a 2:4 weight's three) in order into
    shards of at most ``max_shard_bytes`` of data; a group larger than that gets a shard of its own."""
    shards: list[list[int]] = []
    size = 0
    for i, group in enumerate(groups):
        g = sum(nbytes(e) for e in group)
        if not shards or (size + g > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += g
    return shards or [[]]


def _header(entries: Sequence[Entry]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        end = offset + nbytes((name, dtype, shape))
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes


def write_safetensors(path: Path, entries: Sequence[Entry],
                      tensors: Iterable[torch.Tensor]) -> dict[str, str]:
    """Write ``entries`` to ``path`` (atomically), the data streamed from ``tensors``.

    Args:
        path: the file.
        entries: every tensor's name, dtype and shape, in file order.
        tensors: the tensors in the same order, produced one at a time.

    Returns:
        name -> SHA-256 (hex) of the tensor's bytes as stored.
    """
    header = _header(entries)
    sums: dict[str, str] = {}
    tmp = path.with_name(path.name + ".tmp")
    it = iter(entries)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in tensors:
            name, dtype, shape = next(it)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dtype} {shape}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            sums[name] = hashlib.sha256(data).hexdigest()
        assert next(it, None) is None, "fewer tensors than entries"
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sums


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensors a safetensors file declares (name -> dtype/shape/data_offsets) and where its data
    starts, after checking the file holds all of it.

    Raises:
        ValueError: the file is shorter than its header says (truncated), naming the first tensor
            whose bytes are missing, or it is not a safetensors file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{path.name} is truncated: its header needs {n} bytes, the file has {size - 8}")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path.name} is not a safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0, 0])[1]):
        end = start + int(info["data_offsets"][1])
        if end > size:
            raise ValueError(f"{path.name} is truncated: tensor {name!r} needs bytes up to {end}, the file "
                             f"ends at {size}")
    return header, start


def sha256_range(path: Path, begin: int, end: int, chunk: int = 1 << 24) -> str:
    """SHA-256 (hex) of bytes ``[begin, end)`` of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(begin)
        left = end - begin
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()
