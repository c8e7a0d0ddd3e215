"""2:4 export: the compressed-tensors ``sparse-24-bitmask`` layout in safetensors, and its verified loader.

``save_24(model_or_state_dict, dirpath)`` writes every 2:4 weight as kept values and a bitmask
(about 0.56x of its dense bf16 bytes), everything else dense, with a ``config.json`` holding the
sparsity config and a SHA-256 per tensor; ``load_24(dirpath)`` reads it back bit for bit, refusing
a tampered, truncated or mismatched file. See ``docs/export.md``.
"""

from .checkpoint import save_24_checkpoint
from .config import FORMAT_VERSION
from .layout import check_24, compress_24, decompress_24
from .load import load_24
from .save import DEFAULT_MAX_SHARD_BYTES, ExportSummary, save_24

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMAT_VERSION",
    "ExportSummary",
    "check_24",
    "compress_24",
    "decompress_24",
    "load_24",
    "save_24",
    "save_24_checkpoint",
]
