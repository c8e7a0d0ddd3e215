"""Expert parallelism: token exchange with ``all_to_all_single``, and expert checkpoints by global id.

Legend: S local assignment rows sorted by global expert, R rows received from the other ranks,
P expert-parallel ranks, L experts per rank (E = P*L), D width.

A rank holds the experts ``rank*L ... rank*L + L - 1``. A forward (1) counts the rows it sends to
each global expert, (2) exchanges those counts with every rank of the group (an all-to-all of P*L
integers), (3) reads the per-rank row totals on the host (the layer's one host sync: the split
sizes; every rank then knows exactly what it sends and receives, so no exchange can hang on
disagreeing sizes), (4) sends its rows, (5) regroups the received rows by local expert, runs its
experts, restores the received order and (6) sends the outputs back with the reverse exchange.
The backward runs the same two exchanges in reverse (:class:`_AllToAll`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _gloo
from ._permute import _Permute

__all__ = ["expert_parallel_forward", "expert_state_dict", "full_expert_state_dict", "load_expert_state_dict"]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with split sizes; the backward is the exchange with the sizes swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, recv_sizes: list[int], send_sizes: list[int], group: Any) -> torch.Tensor:
        ctx.sizes, ctx.group = (recv_sizes, send_sizes), group
        out = x.new_empty(sum(recv_sizes), *x.shape[1:])
        dist.all_to_all_single(_gloo.handed(out, group), _gloo.handed(x.contiguous(), group), recv_sizes, send_sizes,
                               group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        recv_sizes, send_sizes = ctx.sizes
        out = g.new_empty(sum(send_sizes), *g.shape[1:])
        dist.all_to_all_single(_gloo.handed(out, ctx.group), _gloo.handed(g.contiguous(), ctx.group), send_sizes,
                               recv_sizes, group=ctx.group)
        return out, None, None, None


def expert_parallel_forward(experts: nn.Module, x_SD: torch.Tensor, offs_E: torch.Tensor, group: Any,
                            ep_size: int) -> torch.Tensor:
    """The experts' output for the local rows ``x_SD`` (sorted by global expert; rows past ``offs_E[-1]``
    are dropped assignments and come back as zeros), computed on the ranks that own the experts."""
    P = ep_size
    L = offs_E.numel() // P
    dev = x_SD.device
    ends_E = offs_E.to(torch.int64)
    counts_E = ends_E - torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    send_PL = counts_E.view(P, L).contiguous()
    recv_PL = torch.empty_like(send_PL)
    dist.all_to_all_single(_gloo.handed(recv_PL, group), _gloo.handed(send_PL, group), group=group)
    sizes = torch.stack([send_PL.sum(1), recv_PL.sum(1)]).tolist()  # the one host sync: the split sizes
    send_sizes, recv_sizes = sizes[0], sizes[1]
    n_send, n_recv = sum(send_sizes), sum(recv_sizes)
    x_recv_RD = _AllToAll.apply(x_SD[:n_send], recv_sizes, send_sizes, group)
    # received rows are ordered (source rank, local expert): regroup them by local expert
    ids_PL = torch.arange(L, device=dev).repeat(P)
    local_R = torch.repeat_interleave(ids_PL, recv_PL.reshape(-1), output_size=n_recv)
    order_R = torch.argsort(local_R, stable=True)
    inv_R = torch.empty_like(order_R)
    inv_R[order_R] = torch.arange(n_recv, device=dev)
    local_sorted_R = local_R[order_R]
    offs_L = torch.searchsorted(local_sorted_R, torch.arange(1, L + 1, device=dev)).to(torch.int32)
    y_sorted_RD = experts(_Permute.apply(x_recv_RD, order_R, inv_R), offs_L, local_sorted_R)
    y_recv_RD = _Permute.apply(y_sorted_RD, inv_R, order_R)
    y_back_SD = _AllToAll.apply(y_recv_RD, send_sizes, recv_sizes, group)
    tail = x_SD.shape[0] - n_send
    if tail:
        y_back_SD = torch.cat([y_back_SD, y_back_SD.new_zeros(tail, y_back_SD.shape[-1])])
    return y_back_SD


def _layers(model: nn.Module) -> dict[str, Any]:
    from .layer import moe_layers  # the layer imports this module

    return moe_layers(model)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's experts by GLOBAL id: ``"<layer>.experts.<param>.<global id>" -> tensor`` (CPU copies).

    The union of every rank's dict (or :func:`full_expert_state_dict`) loads at any expert-parallel size.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers(model).items():
        for pname, p in layer.experts.named_parameters():
            for i, gid in enumerate(layer.local_expert_ids()):
                out[f"{_prefix(name)}experts.{pname}.{gid}"] = p[i].detach().cpu().clone()
    return out


def full_expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert of every layer by global id, gathered over each layer's expert-parallel group
    (an ``all_gather`` of tensors, no pickling); every rank of the group must call it."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers(model).items():
        for pname, p in layer.experts.named_parameters():
            full = p.detach()
            if layer.ep_size > 1:
                parts = [torch.empty_like(full) for _ in range(layer.ep_size)]
                dist.all_gather([_gloo.handed(t, layer.ep_group) for t in parts],
                                _gloo.handed(full.contiguous(), layer.ep_group), group=layer.ep_group)
                full = torch.cat(parts)
            for gid in range(layer.num_experts):
                out[f"{_prefix(name)}experts.{pname}.{gid}"] = full[gid].cpu().clone()
    return out


@torch.no_grad()
def load_expert_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load this rank's experts from a state keyed by global id (any expert-parallel size wrote it).

    Raises:
        ValueError: a key this rank needs is missing, or a tensor has the wrong shape or is not a float
            tensor (nothing is loaded then).
    """
    if not isinstance(state, dict):
        raise ValueError(f"`state` must be a dict of tensors by global expert id, got {type(state).__name__}")
    plan = []
    for name, layer in _layers(model).items():
        for pname, p in layer.experts.named_parameters():
            for i, gid in enumerate(layer.local_expert_ids()):
                key = f"{_prefix(name)}experts.{pname}.{gid}"
                t = state.get(key)
                if t is None:
                    raise ValueError(f"expert state has no {key!r} (global expert {gid} of {name!r})")
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != p.shape[1:]:
                    raise ValueError(f"expert state {key!r} must be a float tensor of shape {tuple(p.shape[1:])}, "
                                     f"got {getattr(t, 'shape', type(t).__name__)}")
                plan.append((p, i, t))
    for p, i, t in plan:
        p[i].copy_(t)
