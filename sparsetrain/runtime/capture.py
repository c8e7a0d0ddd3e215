"""Whole-model host-overhead removal: the forward captured in CUDA graphs at static token counts.

``capture(model, example, token_counts=(512, 1024, ...), token_dim=1)`` captures one CUDA graph per
token count (all in one memory pool, largest first). A call with ``T`` tokens replays the graph of
the smallest captured count ``>= T``, with the input zero-padded up to it, and returns the first
``T`` positions; above the largest count it runs the model eagerly. Padding is only correct for
models whose outputs at real positions do not depend on later positions: token-wise layers (MLPs)
and causal attention, such as the demo GPT. Pass ``pad=False`` to require exact counts instead.

Before capturing, the model runs eagerly a few times per count under
:func:`~sparsetrain.runtime.linear.graph_decisions`, so that cuSPARSELt's algorithm searches and
cuBLAS's workspace set-up happen outside the capture.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn

from .linear import graph_decisions

__all__ = ["CapturedModel", "capture", "padded_count"]


def _check_counts(token_counts: object) -> tuple[int, ...]:
    if isinstance(token_counts, (str, bytes)) or not isinstance(token_counts, Sequence) or not token_counts:
        raise ValueError(f"`token_counts` must be a non-empty sequence of ints >= 1, got {token_counts!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in token_counts):
        raise ValueError(f"`token_counts` must be ints >= 1, got {token_counts!r}")
    return tuple(sorted(set(token_counts)))


def padded_count(token_counts: Sequence[int], tokens: int) -> int | None:
    """The smallest captured count ``>= tokens`` (``token_counts`` sorted), or None above the largest."""
    i = bisect.bisect_left(token_counts, tokens)
    return token_counts[i] if i < len(token_counts) else None


class CapturedModel(nn.Module):
    """``model``'s forward replayed from CUDA graphs; see :func:`capture` (which builds it)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, token_counts: Sequence[int], *, token_dim: int,
                 out_token_dim: int | None = None, pad: bool = True, warmup: int = 2,
                 clone_outputs: bool = True) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"`example` must be a tensor, got {type(example).__name__}")
        counts = _check_counts(token_counts)
        ndim = example.dim()
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or not -ndim <= token_dim < ndim:
            raise ValueError(f"`token_dim` must index a dim of `example` (shape {tuple(example.shape)}), "
                             f"got {token_dim!r}")
        if out_token_dim is not None and (isinstance(out_token_dim, bool) or not isinstance(out_token_dim, int)):
            raise ValueError(f"`out_token_dim` must be an int or None, got {out_token_dim!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be an int >= 1, got {warmup!r}")
        if example.device.type != "cuda":
            raise ValueError(f"`example` must be on CUDA to capture CUDA graphs, got {example.device}")
        self.model = model
        self.token_counts = counts
        self.token_dim = token_dim % example.dim()
        self.out_token_dim = self.token_dim if out_token_dim is None else out_token_dim
        self.pad = bool(pad)
        self.clone_outputs = bool(clone_outputs)
        self._shape = tuple(example.shape)
        self._dtype, self._device = example.dtype, example.device
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._graphs: list[torch.cuda.CUDAGraph] = []
        pool = torch.cuda.graph_pool_handle()
        captured = {}
        stream = torch.cuda.Stream(device=example.device)
        with torch.no_grad():
            for n in reversed(counts):  # largest first: the smaller graphs reuse its pool
                shape = list(example.shape)
                shape[self.token_dim] = n
                static_in = example.new_zeros(shape)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), graph_decisions():
                    for _ in range(warmup):
                        model(static_in)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), graph_decisions():
                    static_out = model(static_in)
                if not isinstance(static_out, torch.Tensor):
                    raise TypeError(f"capture needs a model that returns one tensor, got {type(static_out).__name__}")
                if static_out.dim() <= self.out_token_dim or static_out.shape[self.out_token_dim] != n:
                    raise ValueError(f"the output (shape {tuple(static_out.shape)}) has no token dim "
                                     f"{self.out_token_dim} of size {n}: pass `out_token_dim`")
                captured[n] = (static_in, static_out, graph)
        for n in counts:
            static_in, static_out, graph = captured[n]
            self._inputs.append(static_in)
            self._outputs.append(static_out)
            self._graphs.append(graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a tensor, got {type(x).__name__}")
        if x.dim() != len(self._shape) or any(
                s != e for d, (s, e) in enumerate(zip(x.shape, self._shape)) if d != self.token_dim):
            raise ValueError(f"input shape {tuple(x.shape)} must match the captured {self._shape} "
                             f"except in dim {self.token_dim}")
        if x.dtype != self._dtype or x.device != self._device:
            raise TypeError(f"input must be {self._dtype} on {self._device}, got {x.dtype} on {x.device}")
        tokens = x.shape[self.token_dim]
        n = padded_count(self.token_counts, tokens)
        if n is None or (not self.pad and n != tokens):
            if not self.pad and n is not None:
                raise ValueError(f"{tokens} tokens is not a captured count {self.token_counts} (pad=False)")
            with torch.no_grad():
                return self.model(x)
        i = self.token_counts.index(n)
        static_in = self._inputs[i]
        static_in.narrow(self.token_dim, 0, tokens).copy_(x)
        if tokens < n:
            static_in.narrow(self.token_dim, tokens, n - tokens).zero_()
        self._graphs[i].replay()
        out = self._outputs[i]
        if tokens < n:
            out = out.narrow(self.out_token_dim, 0, tokens)
        return out.clone() if self.clone_outputs else out


def capture(model: nn.Module, example: torch.Tensor, token_counts: Sequence[int], *, token_dim: int,
            out_token_dim: int | None = None, pad: bool = True, warmup: int = 2,
            clone_outputs: bool = True) -> CapturedModel:
    """Capture ``model``'s forward in one CUDA graph per token count (inference, no gradients).

    Args:
        model: a CUDA model taking one tensor and returning one tensor (put it in ``eval()`` mode).
        example: an input of the right shape, dtype and device except along ``token_dim`` (only its
            shape, dtype and device are used).
        token_counts: the static token counts to capture, e.g. ``(512, 1024, 2048, 4096)``.
        token_dim: the input's token dim (1 for ``idx_BT``, 0 for ``x_TD``).
        out_token_dim: the output's token dim (default: ``token_dim``).
        pad: pad a call up to the next captured count (True), or refuse counts not captured. Calls
            above the largest count run eagerly either way.
        warmup: eager calls per count before capturing.
        clone_outputs: return a copy (True) or a view of the graph's static output, which the next
            call overwrites (the graphs share one memory pool).

    Returns:
        A :class:`CapturedModel`: call it like ``model``.

    Raises:
        TypeError, ValueError: invalid arguments, naming them.

    Example::

        fast = capture(model.eval(), idx_BT, token_counts=(512, 1024, 2048), token_dim=1)
        logits_BTV = fast(idx_BT)
    """
    return CapturedModel(model, example, token_counts, token_dim=token_dim, out_token_dim=out_token_dim, pad=pad,
                         warmup=warmup, clone_outputs=clone_outputs)
