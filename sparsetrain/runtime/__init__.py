"""GPU 2:4 inference: cuSPARSELt Linear layers, a per-GPU dispatch table, CUDA-graph capture.

    model = sparsify_model(model)                       # 2:4 Linears swapped in, dispatched per call
    fast = capture(model, example, token_counts=(512, 1024, 2048), token_dim=1)

See docs/runtime.md.
"""

from .capture import CapturedModel, capture
from .eligibility import DIM_MULTIPLE, SPARSE_DTYPES, first_bad_group, is_24
from .linear import Sparse24Linear
from .sparsify import BACKENDS, sparse_layers, sparsify_model
from .table import DEFAULT_BUCKETS, DispatchTable, LayerPlan, Timing, cache_dir, clear_cache

__all__ = [
    "BACKENDS",
    "DEFAULT_BUCKETS",
    "DIM_MULTIPLE",
    "SPARSE_DTYPES",
    "CapturedModel",
    "DispatchTable",
    "LayerPlan",
    "Sparse24Linear",
    "Timing",
    "cache_dir",
    "capture",
    "clear_cache",
    "first_bad_group",
    "is_24",
    "sparse_layers",
    "sparsify_model",
]
