"""``sparsify_model``: every eligible 2:4 Linear of a model swapped for a :class:`Sparse24Linear`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .. import contract
from . import _cslt
from .eligibility import ineligible_reason
from .linear import Sparse24Linear
from .table import DispatchTable

__all__ = ["BACKENDS", "sparse_layers", "sparsify_model"]

BACKENDS = ("auto", "cusparselt", "dense")


def sparsify_model(model: nn.Module, *, backend: str = "auto", table: DispatchTable | None = None,
                   ignore: Sequence[str] = (), min_tokens: int = 1) -> nn.Module:
    """Swap each eligible ``nn.Linear`` whose weight is exactly 2:4 for a :class:`Sparse24Linear`.

    Eligible: a plain ``nn.Linear`` (not a subclass, not parametrized), bf16 or fp16, both dims
    multiples of 16, on CUDA for the cuSPARSELt backends, with at most 2 nonzeros in every group of
    4 along the input dim, and not matched by ``ignore``. Every other Linear stays as it is, and
    one warning lists them with the reason.

    Args:
        model: the model, changed in place (inference only: the swapped layers hold buffers, not
            parameters).
        backend: ``"auto"``: cuSPARSELt where available, each layer choosing 2:4 or dense per
            token-count bucket from ``table``; dense (with a warning) where cuSPARSELt is not.
            ``"cusparselt"``: 2:4 for every call, no dense copy kept (least memory), no table.
            ``"dense"``: the same modules running ``F.linear`` (for machines without cuSPARSELt).
        table: the dispatch table for ``"auto"`` (default: this GPU's, from the cache, measuring
            the model's missing shapes once, a few seconds).
        ignore: globs over qualified module names (``fnmatch``) of Linears to leave alone.
        min_tokens: the fewest tokens the model will be called with; ``"auto"`` keeps a dense copy
            of a layer only where a bucket at or above it runs dense (a call with fewer tokens then
            runs 2:4). 1 (the default) keeps every dense copy the table asks for.

    Returns:
        ``model`` (or the new module when ``model`` itself is an eligible ``nn.Linear``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``table`` not a ``DispatchTable``.
        ValueError: an unknown ``backend``, ``table`` with a backend other than ``"auto"``,
            ``"cusparselt"`` without CUDA and cuSPARSELt, malformed ``ignore`` or ``min_tokens``.

    Example::

        model = sparsify_model(model.to("cuda", torch.bfloat16).eval())
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if table is not None and not isinstance(table, DispatchTable):
        raise TypeError(f"`table` must be a DispatchTable or None, got {type(table).__name__}")
    if table is not None and backend != "auto":
        raise ValueError(f"`table` is only used with backend='auto', got backend={backend!r}")
    ignore = contract.check_patterns(ignore, "ignore") or ()
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"`min_tokens` must be an int >= 1, got {min_tokens!r}")
    notes = []
    resolved = backend
    if backend == "cusparselt" and not _cslt.available():
        raise ValueError("backend='cusparselt' needs CUDA with cuSPARSELt (torch.cuda.is_available()="
                         f"{torch.cuda.is_available()}, cuSPARSELt {_cslt.version()}); use 'auto' or 'dense'")
    if backend == "auto":
        resolved = "cusparselt" if _cslt.available() else "dense"
        if resolved == "dense":
            notes.append("cuSPARSELt is not available here: the 2:4 layers run dense")
    # a Linear shared under several names is swapped under all of them, for one module
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Linear] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear) and not contract.matches(name, ignore):
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    eligible: list[tuple[list[str], nn.Linear]] = []
    ineligible: list[str] = []
    for key, module in modules.items():
        reason = ineligible_reason(module, needs_cuda=resolved == "cusparselt")
        if reason is None:
            eligible.append((names[key], module))
        else:
            ineligible.append(f"{', '.join(n or '<model>' for n in names[key])} ({reason})")
    del modules
    if ineligible:
        notes.append(f"{len(ineligible)} Linear layer(s) stay dense: {'; '.join(ineligible)}")
    if notes:
        warnings.warn("sparsify_model: " + ". ".join(notes), stacklevel=2)

    plans = {}
    if backend == "auto" and resolved == "cusparselt" and eligible:
        shapes = list(dict.fromkeys((tuple(m.weight.shape), m.weight.dtype) for _, m in eligible))
        if table is None:
            table = DispatchTable.cached(eligible[0][1].weight.device)
        table.measure(shapes, device=eligible[0][1].weight.device)
        plans = {shape: table.plan(*shape) for shape in shapes}
    eligible.reverse()
    while eligible:  # popped one by one: each dense Linear is freed once swapped (unless its copy is kept)
        layer_names, module = eligible.pop()
        if resolved == "dense":
            new = Sparse24Linear.from_linear(module, backend="dense")
        elif backend == "cusparselt":
            new = Sparse24Linear.from_linear(module, backend="cusparselt", plan=None, keep_dense=False)
        else:
            plan = plans[(tuple(module.weight.shape), module.weight.dtype)]
            if plan.runs_sparse_anywhere(min_tokens):
                new = Sparse24Linear.from_linear(module, backend="cusparselt", plan=plan,
                                                 keep_dense=plan.runs_dense_anywhere(min_tokens))
            else:
                new = Sparse24Linear.from_linear(module, backend="dense")
        for name in layer_names:
            if not name:
                return new
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        del module, new
    return model


def sparse_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> ``"2:4"``, ``"2:4 + dense"`` or ``"dense"`` for every :class:`Sparse24Linear`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Sparse24Linear):
            if module.packed is None:
                out[name] = "dense"
            else:
                out[name] = "2:4" if module.weight is None else "2:4 + dense"
    return out
