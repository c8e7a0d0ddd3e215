"""Sparse upcycling (Komatsuzaki et al. 2022): dense MLPs become MoE layers whose experts are copies.

A dense MLP here is any module whose direct children hold exactly two ``nn.Linear`` layers, the first
``D -> F`` and the second ``F -> D``, and that computes ``fc_out(act(fc_in(x)))`` with ``act`` GELU
(the demo GPT's ``MLP``, ``nn.Sequential(Linear, GELU, Linear)``, ...). Every expert of the new layer
starts as a copy of that MLP and the router is freshly initialised, so with gates that sum to one
(renormalised top-k, the default here for every k, or top-k-then-softmax) and no dropped token, the
layer computes exactly the dense function at init. The replacement is checked on a random input before it is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparsetrain import _warn, contract

from .layer import MoE
from .router import RouterConfig

__all__ = ["dense_mlps", "upcycle"]


def _linears(module: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """The (fc_in, fc_out) pair of a dense MLP, or None when the module is not one."""
    if module._parameters and any(p is not None for p in module._parameters.values()):
        return None
    children = list(module.children())
    linears = [c for c in children if isinstance(c, nn.Linear)]
    others = [c for c in children if not isinstance(c, nn.Linear)]
    if len(linears) != 2 or any(any(True for _ in c.parameters()) for c in others):
        return None
    a, b = linears
    if a.in_features != b.out_features or a.out_features != b.in_features:
        return None
    return a, b


def dense_mlps(model: nn.Module, include: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The modules :func:`upcycle` can replace, by qualified name, filtered by ``include`` globs.

    Raises:
        ValueError: an ``include`` pattern matches no dense MLP (naming it and the candidates).
    """
    include = contract.check_patterns(include, "include")
    root = contract._root(model)
    found = {n: m for n, m in root.named_modules() if n and not isinstance(m, MoE) and _linears(m) is not None}
    for p in include or ():
        if not any(contract.matches(n, [p]) for n in found):
            names = ", ".join(found) or "(none)"
            raise ValueError(f"`include` pattern {p!r} matches no dense MLP; dense MLPs: {names}")
    return {n: m for n, m in found.items() if include is None or contract.matches(n, include)}


@torch.no_grad()
def upcycle(model: nn.Module, *, num_experts: int, k: int = 2, include: Sequence[str] | None = None,
            check: bool = True, **router_fields: Any) -> dict[str, MoE]:
    """Replace dense GELU MLPs of ``model`` in place by MoE layers whose experts copy them.

    Args:
        model: the model (changed in place; a DDP wrapper stands for its module: upcycle before wrapping).
        num_experts: E.
        k: experts per token.
        include: globs over qualified module names (``["blocks.*.mlp"]``); None: every dense MLP.
        check: run each new layer and its dense MLP on a random input (eval mode, no dropping) and raise
            when they differ: the MLP is then not ``fc_out(gelu(fc_in(x)))``.
        **router_fields: :class:`~sparsetrain.moe.RouterConfig` fields (``capacity_factor``, ``dropless``...).

    Returns:
        The new layers by qualified name.

    Raises:
        ValueError: no dense MLP selected, a bad router field (naming it), or a module that failed ``check``.

    Example::

        >>> from sparsetrain.demo import GPT, GPTConfig
        >>> gpt = GPT(GPTConfig(n_layer=1, d_model=64))
        >>> list(upcycle(gpt, num_experts=4, k=2))
        ['blocks.0.mlp']
    """
    router_fields.setdefault("renormalize", True)  # k = 1 too: gate 1, the dense function at init
    router = RouterConfig(num_experts=num_experts, k=k, **router_fields)
    if router.score_order == "softmax_topk" and not router.renormalize:
        _warn.warn("upcycle with renormalize=False: the gates do not sum to one, so the upcycled "
                      "layers do not compute the dense function at init", stacklevel=2)
    targets = dense_mlps(model, include)
    if not targets:
        raise ValueError("`model` has no dense MLP (a module with two Linear layers D -> F -> D) to upcycle")
    root = contract._root(model)
    out: dict[str, MoE] = {}
    for name, mlp in targets.items():
        fc_in, fc_out = _linears(mlp)  # type: ignore[misc]
        if any(isinstance(c, nn.Dropout) and c.p > 0 for c in mlp.children()):
            _warn.warn(f"{name}: the dense MLP's dropout is not carried into the MoE layer", stacklevel=2)
        bias = fc_in.bias is not None or fc_out.bias is not None
        w = fc_in.weight
        layer = MoE(fc_in.in_features, fc_in.out_features, num_experts, k, activation="gelu", bias=bias,
                    router=dataclasses.replace(router)).to(device=w.device, dtype=w.dtype)
        ex = layer.experts
        ex.w1_EFD.copy_(fc_in.weight.expand_as(ex.w1_EFD))
        ex.w2_EDF.copy_(fc_out.weight.expand_as(ex.w2_EDF))
        if bias:
            ex.b1_EF.copy_(fc_in.bias.expand_as(ex.b1_EF) if fc_in.bias is not None else 0)
            ex.b2_ED.copy_(fc_out.bias.expand_as(ex.b2_ED) if fc_out.bias is not None else 0)
        layer.train(mlp.training)
        if check:
            _check_same_function(name, mlp, layer)
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, layer)
        out[name] = layer
    return out


def _check_same_function(name: str, mlp: nn.Module, layer: MoE) -> None:
    was = mlp.training, layer.training
    cfg = layer.config
    saved = cfg.dropless
    mlp.eval()
    layer.eval()
    cfg.dropless = True
    try:
        p = layer.experts.w1_EFD
        x = torch.randn(8, layer.d_model, generator=torch.Generator().manual_seed(0)).to(device=p.device,
                                                                                       dtype=p.dtype)
        want, got = mlp(x), layer(x)
    finally:
        cfg.dropless = saved
        mlp.train(was[0])
        layer.train(was[1])
        layer.aux_loss = layer.z_loss = None
        layer._stats = {}
    tol = 1e-5 if p.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
        gates_sum_to_one = cfg.renormalize or cfg.score_order == "topk_softmax"
        why = "does not compute fc_out(gelu(fc_in(x)))" if gates_sum_to_one else "gates do not sum to one"
        raise ValueError(f"upcycling {name!r}: the MoE layer differs from the dense module at init ({why}); "
                         "exclude it with `include`, or pass check=False")
