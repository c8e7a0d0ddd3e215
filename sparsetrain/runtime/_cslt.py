"""The private torch calls of the runtime, in one place: cuSPARSELt through ``torch._cslt_*``.

The public path they replace is ``torch.sparse.to_sparse_semi_structured`` followed by
``F.linear``, which compresses with the same ``torch._cslt_compress`` and multiplies with the same
``torch._cslt_sparse_mm`` (alg_id 0) but goes through a tensor subclass and a custom op on every
call. ``tests/sparsetrain/runtime/test_cslt.py`` holds these functions to that path on the GPU.

Facts this module relies on (torch 2.11-2.13, ``aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp``):

* ``_cslt_compress(w_OI)`` returns a flat tensor of ``O * I * 9 / 16`` elements (16-bit dtypes,
  ``* 10 / 16`` for 8-bit ones): the kept values followed by the metadata. It is backend-, GPU- and
  version-specific: never stored on disk. We keep it as an ``[O, I * 9 / 16]`` view so that
  torch's meta kernel, which reads ``size(0)`` as the output width, gets the right shape under
  ``torch.compile`` (torch's own ``prune_dense_static_sort`` does the same).
* cuSPARSELt computes ``W @ B``; for a linear layer ``B = x_RI.t()``. A transposed *non-contiguous*
  ``B`` is read as the row-major ``[R, I]`` matrix it is a view of, so ``x_RI`` must be contiguous;
  ``transpose_result=True`` returns ``y_RO`` directly, with ``bias_O`` added per output feature.
  fp16 does not use that form (see :func:`_fused_transpose`): it gets ``y_OR`` and returns its
  transposed view.
* A scalar ``alpha`` tensor is read with ``.item()`` on every call, a host sync that breaks CUDA
  graph capture; this module never passes ``alpha``.
* ``_cslt_sparse_mm_search`` runs every algorithm on the given operands and returns the fastest
  ``alg_id`` (torch 2.13 deprecates it with a warning, silenced here).

Legend: O output features, I input features, R rows (tokens).
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["available", "compress", "linear", "search", "supports", "version"]

# Row count of the dense operand is padded to a multiple of this (torch's own dense_min_rows for
# 16-bit dtypes in SparseSemiStructuredTensorCUSPARSELT).
ROW_MULTIPLE = 8


def available() -> bool:
    """True where CUDA and torch's cuSPARSELt bindings are both present."""
    return bool(torch.cuda.is_available() and torch.backends.cusparselt.is_available())


def supports(device: torch.device) -> bool:
    """Whether tensors on ``device`` can go through these calls (CUDA only)."""
    return device.type == "cuda"


def version() -> int | None:
    """cuSPARSELt's version as an int (``602`` for 0.6.2), or None without it."""
    if not torch.backends.cusparselt.is_available():
        return None
    return torch.backends.cusparselt.version()


def compress(weight_OI: torch.Tensor) -> torch.Tensor:
    """The cuSPARSELt-packed form of a 2:4 ``[O, I]`` CUDA weight, viewed as ``[O, -1]``."""
    packed = torch._cslt_compress(weight_OI.contiguous())
    rows = weight_OI.shape[0]
    return packed.view(rows, -1) if rows and packed.numel() % rows == 0 else packed


def _operand(x_RI: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x_RI`` contiguous, 16-byte aligned and padded to a multiple of ``ROW_MULTIPLE`` rows."""
    if not x_RI.is_contiguous():
        x_RI = x_RI.contiguous()
    elif not torch.compiler.is_compiling() and x_RI.data_ptr() % 16:  # a view at an odd storage offset
        x_RI = x_RI.clone()
    rows = x_RI.shape[0]
    pad = (-rows) % ROW_MULTIPLE
    if pad:
        x_RI = torch.nn.functional.pad(x_RI, (0, 0, 0, pad))
    return x_RI, rows


def _fused_transpose(dtype: torch.dtype) -> bool:
    """Whether cuSPARSELt writes ``y_RO`` itself (``transpose_result=True``): not for fp16, where that
    form breaks on cuSPARSELt 0.8 (the algorithm search fails and leaves the context broken, and the
    default algorithm spent ~200 ms per eager call on the lent H100; ``benchmarks/cslt_probe.py``)."""
    return dtype != torch.float16


def linear(packed: torch.Tensor, x_RI: torch.Tensor, bias_O: torch.Tensor | None, alg_id: int = 0,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x_RI @ W.t() + bias_O`` with ``W`` packed by :func:`compress`: ``y_RO`` (for fp16 a transposed
    view of the ``[O, R]`` product)."""
    x_RI, rows = _operand(x_RI)
    kwargs = {} if out_dtype is None else {"out_dtype": out_dtype}
    if _fused_transpose(packed.dtype):
        y_RO = torch._cslt_sparse_mm(packed, x_RI.t(), bias=bias_O, transpose_result=True, alg_id=alg_id, **kwargs)
    else:
        y_RO = torch._cslt_sparse_mm(packed, x_RI.t(), bias=bias_O, alg_id=alg_id, **kwargs).t()
    return y_RO if y_RO.shape[0] == rows else y_RO[:rows]


def search(packed: torch.Tensor, x_RI: torch.Tensor, bias_O: torch.Tensor | None) -> int:
    """The fastest cuSPARSELt ``alg_id`` for these operands, in the form :func:`linear` calls (runs
    every algorithm: not under capture); 0 with a warning where the search fails."""
    x_RI, _ = _operand(x_RI)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_cslt_sparse_mm_search is deprecated.*")
        try:
            return int(torch._cslt_sparse_mm_search(packed, x_RI.t(), bias=bias_O,
                                                    transpose_result=_fused_transpose(packed.dtype)))
        except (AttributeError, RuntimeError) as err:  # no search in this torch: the default algorithm
            warnings.warn(f"cuSPARSELt algorithm search failed ({str(err).splitlines()[0]}); using alg_id 0",
                          stacklevel=2)
            return 0
