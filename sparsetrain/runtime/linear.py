"""``Sparse24Linear``: a Linear whose 2:4 weight is compressed once for cuSPARSELt.

Per call it picks 2:4 or dense from its :class:`~sparsetrain.runtime.table.LayerPlan` by the token
count (a shape: no host sync) and the mode: under :func:`graph_decisions` (which
:func:`~sparsetrain.runtime.capture` sets while it warms up and captures) or inside ``torch.compile``
it follows the graph timings, otherwise the eager ones (where cuSPARSELt's per-call host set-up
counts). A CUDA graph captured by hand without :func:`graph_decisions` gets the eager decisions:
correct, maybe slower (asking the driver whether a capture is under way on every call would cost
more host time than an eager call at a few tokens has). The cuSPARSELt algorithm is searched once
per bucket (outside any capture) and reused.

Legend: O output features, I input features, R rows (tokens: the product of the input's leading dims).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import _cslt
from .eligibility import DIM_MULTIPLE, SPARSE_DTYPES, first_bad_group
from .table import DEFAULT_BUCKETS, LayerPlan, bucket_index

__all__ = ["Sparse24Linear", "graph_decisions"]

_GRAPH_MODE = contextvars.ContextVar("sparsetrain_runtime_graph_mode", default=False)


@contextlib.contextmanager
def graph_decisions() -> Iterator[None]:
    """Inside: every :class:`Sparse24Linear` decides as it will inside a CUDA graph.

    :func:`~sparsetrain.runtime.capture` warms the model up and captures it under this, so that the
    calls it captures are the ones it warmed up (algorithm searches included). Wrap a capture of
    your own (``torch.cuda.graph``) and its warm-up in it to get the graph-mode decisions.
    """
    token = _GRAPH_MODE.set(True)
    try:
        yield
    finally:
        _GRAPH_MODE.reset(token)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class Sparse24Linear(nn.Module):
    """A 2:4 Linear: ``y = x @ W.t() + b`` with ``W`` compressed for cuSPARSELt.

    Build it with :meth:`from_linear` (or :func:`~sparsetrain.runtime.sparsify_model` for a whole
    model). Inference only: no gradients flow to the weight.

    Args:
        weight: ``[O, I]`` 2:4 weight (at most 2 nonzeros per group of 4 along ``I``), bf16/fp16,
            both dims multiples of 16; on CUDA for ``backend="cusparselt"``.
        bias: ``[O]`` or None, same dtype and device.
        backend: ``"cusparselt"`` (2:4 kernels, dispatched by ``plan``) or ``"dense"`` (``F.linear``
            only: the same module on machines without cuSPARSELt).
        plan: per token-count bucket, 2:4 or dense (from :meth:`DispatchTable.plan`); None: 2:4
            for every call.
        keep_dense: keep the dense weight for the buckets ``plan`` runs dense (None: exactly when
            ``plan`` has such buckets). Without it every call runs 2:4 and the layer's memory is
            about 0.56x dense.

    Raises:
        TypeError, ValueError: for anything above that does not hold, naming it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "cusparselt",
                 plan: LayerPlan | None = None, keep_dense: bool | None = None) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"`weight` must be a 2-D tensor, got {type(weight).__name__}"
                            f"{'' if not isinstance(weight, torch.Tensor) else f' of shape {tuple(weight.shape)}'}")
        if weight.dtype not in SPARSE_DTYPES:
            raise TypeError(f"`weight` must be bfloat16 or float16, got {weight.dtype}")
        out_features, in_features = weight.shape
        if out_features % DIM_MULTIPLE or in_features % DIM_MULTIPLE:
            raise ValueError(f"`weight` dims must be multiples of {DIM_MULTIPLE}, got {out_features}x{in_features}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.shape != (out_features,):
                raise ValueError(f"`bias` must be a tensor of shape ({out_features},) or None, got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            if bias.dtype != weight.dtype or bias.device != weight.device:
                raise TypeError(f"`bias` must match the weight's dtype and device ({weight.dtype}, {weight.device}), "
                                f"got {bias.dtype}, {bias.device}")
        if backend not in ("cusparselt", "dense"):
            raise ValueError(f"`backend` must be 'cusparselt' or 'dense', got {backend!r}")
        if plan is not None and not isinstance(plan, LayerPlan):
            raise TypeError(f"`plan` must be a LayerPlan or None, got {type(plan).__name__}")
        if keep_dense is not None and not isinstance(keep_dense, bool):
            raise TypeError(f"`keep_dense` must be a bool or None, got {keep_dense!r}")
        with torch.no_grad():
            weight = weight.detach()
            bad = first_bad_group(weight)
            if bad is not None:
                raise ValueError(f"`weight` is not 2:4: row {bad[0]}, columns {4 * bad[1]}..{4 * bad[1] + 3} "
                                 "hold more than 2 nonzeros")
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        if backend == "cusparselt":
            if not _cslt.supports(weight.device):
                raise ValueError(f"backend='cusparselt' needs the weight on CUDA, got {weight.device}")
            if plan is None:  # 2:4 everywhere, the algorithm searched once per default bucket
                n = len(DEFAULT_BUCKETS)
                plan = LayerPlan(buckets=DEFAULT_BUCKETS, sparse_eager=(True,) * n, sparse_graph=(True,) * n,
                                 alg_ids=(None,) * n)
            if keep_dense is None:
                keep_dense = plan.runs_dense_anywhere()
            self.register_buffer("packed", _cslt.compress(weight), persistent=False)
            self._buckets = plan.buckets
            self._sparse_eager = plan.sparse_eager
            self._sparse_graph = plan.sparse_graph
            self._alg_ids: list[int | None] = list(plan.alg_ids)
        else:
            keep_dense = True
            self.register_buffer("packed", None, persistent=False)
            self._buckets, self._sparse_eager, self._sparse_graph, self._alg_ids = (1,), (False,), (False,), [None]
        self.register_buffer("weight", weight if keep_dense else None)  # shares the storage
        # rows -> (runs 2:4 eagerly, runs 2:4 in graph mode, bucket index): filled by eager calls
        self._decisions: dict[int, tuple[bool, bool, int]] = {}
        self.register_buffer("bias", None if bias is None else bias.detach())

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() must not convert the packed bytes (values and metadata in one
        # tensor): refuse a change of its dtype or device before anything moves.
        if self.packed is not None:
            probe = fn(torch.empty(0, dtype=self.packed.dtype, device=self.packed.device))
            if probe.dtype != self.packed.dtype or probe.device != self.packed.device:
                raise RuntimeError("a Sparse24Linear cannot change dtype or device (its weight is packed for "
                                   f"cuSPARSELt on {self.packed.device}): move the model before sparsify_model")
        return super()._apply(fn, recurse)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str = "cusparselt", plan: LayerPlan | None = None,
                    keep_dense: bool | None = None) -> Sparse24Linear:
        """The 2:4 module of ``linear`` (whose weight must be 2:4); ``linear`` is left unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"`linear` must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, backend=backend, plan=plan, keep_dense=keep_dense)

    @property
    def dtype(self) -> torch.dtype:
        return (self.packed if self.packed is not None else self.weight).dtype

    def extra_repr(self) -> str:
        mode = self.backend if self.weight is None or self.packed is None else f"{self.backend} + dense fallback"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"

    def uses_sparse(self, tokens: int, *, graph: bool = False) -> bool:
        """Whether a call with ``tokens`` rows runs 2:4 (in graph mode or eagerly)."""
        if self.packed is None:
            return False
        if self.weight is None:
            return True
        i = bucket_index(self._buckets, tokens)
        return (self._sparse_graph if graph else self._sparse_eager)[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_features = self.in_features
        if x.dim() < 1 or x.shape[-1] != in_features:
            raise ValueError(f"input's last dim must be in_features={in_features}, got shape {tuple(x.shape)}")
        buffers = self._buffers  # a plain dict: skips nn.Module.__getattr__ on the hot path
        packed, weight, bias = buffers["packed"], buffers["weight"], buffers["bias"]
        rows = x.numel() // in_features if in_features else 0
        if torch.compiler.is_compiling():
            i = bucket_index(self._buckets, rows)
            sparse = packed is not None and rows > 0 and (weight is None or self._sparse_graph[i])
        else:
            # Eager calls are host-bound at small token counts: one dict lookup decides (no capture
            # query: graph mode is graph_decisions(), which capture() and cuda_ms set).
            decision = self._decisions.get(rows)
            if decision is None:
                i = bucket_index(self._buckets, rows)
                runs = packed is not None and rows > 0
                decision = self._decisions[rows] = (runs and (weight is None or self._sparse_eager[i]),
                                                    runs and (weight is None or self._sparse_graph[i]), i)
            sparse, sparse_graph, i = decision
            if sparse != sparse_graph and _GRAPH_MODE.get():
                sparse = sparse_graph
        if not sparse:
            if weight is None:  # rows == 0 without a dense copy
                return x.new_empty(*x.shape[:-1], self.out_features)
            return F.linear(x, weight, bias)
        if x.dtype != packed.dtype or x.device != packed.device:
            raise TypeError(f"input must be {packed.dtype} on {packed.device}, got {x.dtype} on {x.device}")
        x_RI = x.reshape(rows, in_features)
        alg = self._alg_ids[i]
        if alg is None:
            if _capturing(x) or torch.compiler.is_compiling():
                alg = 0  # no search inside a capture: the default algorithm
            else:
                alg = self._alg_ids[i] = _cslt.search(packed, x_RI, bias)
        y_RO = _cslt.linear(packed, x_RI, bias, alg)
        return y_RO.reshape(*x.shape[:-1], self.out_features)  # fp16: a transposed view, kept as it is for 2-D x
