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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _gloo
from ._permute import _Permute
from .experts import mark_stacked

__all__ = [
    "derive_expert_data_parallel_group",
    "expert_data_parallel_groups",
    "expert_parallel_forward",
    "expert_parameter_names",
    "expert_state_dict",
    "full_expert_optimizer_state_dict",
    "full_expert_state_dict",
    "gather_expert_stack",
    "globalize_optimizer_state",
    "load_expert_optimizer_state_dict",
    "load_expert_state_dict",
    "localize_optimizer_state",
    "reduce_expert_gradients",
    "shard_experts",
]


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


# ---------------------------------------------------------------------- building the expert-parallel model


def expert_data_parallel_groups(ep_size: int) -> tuple[Any, Any]:
    """``(ep_group, edp_group)`` of this rank for a world of W ranks and expert-parallel size P.

    The expert-parallel groups are consecutive ranks (``g*P ... g*P + P - 1``: one copy of all experts);
    the expert-data-parallel groups are the W/P ranks that hold the same experts (``r, r+P, r+2P, ...``).
    Every rank must call this (``new_group`` is collective). With P = 1 the ep group is None.

    Raises:
        ValueError: ``ep_size`` < 1, or it does not divide the world size; torch.distributed not initialised
            while ``ep_size`` > 1.
    """
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"`ep_size` must be an int >= 1, got {ep_size!r}")
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size > 1:
            raise ValueError(f"`ep_size`={ep_size} needs torch.distributed to be initialised")
        return None, None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"`ep_size`={ep_size} must divide the world size {world}")
    ep_group = edp_group = None
    for g in range(world // ep_size):  # every rank creates every group, in the same order
        grp = dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)))
        if rank // ep_size == g:
            ep_group = grp
    for r in range(ep_size):
        grp = dist.new_group(list(range(r, world, ep_size)))
        if rank % ep_size == r:
            edp_group = grp
    return (ep_group if ep_size > 1 else None), edp_group


def derive_expert_data_parallel_group(layers: Mapping[str, Any]) -> Any:
    """This rank's expert-data-parallel group (the ranks holding the same experts), derived from the
    expert-parallel groups of ``layers`` (name -> an MoE layer with ``ep_group``; e.g. ``moe_layers(model)``).

    Within its expert-parallel group of P ranks, a rank at index i (its rank in that group) holds the experts
    ``i*E/P ... (i+1)*E/P - 1``, so the ranks at the same index hold the same experts, whatever the layout of
    the groups (consecutive ranks as :func:`expert_data_parallel_groups` builds them, or any other). Every
    rank sends ``(index, P, first rank of its group, whether its layers agree)`` to every other (one
    ``all_gather`` of a few int64, no pickling), checks that the groups partition the world into groups of
    one size P, each index appearing W/P times, and then creates the P groups with ``new_group``, in the same
    order on every rank (collective: every rank of the default group must call this, with layers built
    alike). Layers without expert parallelism (``ep_size`` 1) are skipped.

    Args:
        layers: name -> layer, the names used in messages (the sparsifier passes its expert stacks).

    Returns:
        The group, or None when no layer is expert-parallel or each expert has one rank (W = P).

    Raises:
        ValueError: the expert-parallel layers of one rank do not share one group's ranks (naming the two
            layers that differ), or the layout of the ranks is not consistent: groups of different sizes, or
            groups that overlap or miss ranks (raised on every rank, with the same message on all but the
            rank whose layers differ).

    Example::

        >>> ep_group, _ = expert_data_parallel_groups(2)  # doctest: +SKIP
        >>> shard_experts(model, ep_group)  # doctest: +SKIP
        >>> edp_group = derive_expert_data_parallel_group(moe_layers(model))  # doctest: +SKIP
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"`layers` must be a mapping of name -> MoE layer, got {type(layers).__name__}")
    sharded = {n: m for n, m in layers.items() if getattr(m, "ep_group", None) is not None
               and getattr(m, "ep_size", 1) > 1}
    if not sharded or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    first_name, first = next(iter(sharded.items()))
    ranks = dist.get_process_group_ranks(first.ep_group)
    local_error = None
    for name, layer in sharded.items():
        other = dist.get_process_group_ranks(layer.ep_group)
        if other != ranks and local_error is None:
            local_error = (f"the expert-parallel layers of rank {rank} do not share one layout: {first_name!r} is "
                           f"expert-parallel over ranks {ranks}, {name!r} over ranks {other}; one expert-data-"
                           "parallel group cannot serve both")
    if rank not in ranks and local_error is None:
        local_error = f"rank {rank} is not in the expert-parallel group of {first_name!r} (ranks {ranks})"
    index = ranks.index(rank) if rank in ranks else -1
    row = torch.tensor([index, len(ranks), ranks[0], local_error is not None], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        row = row.cuda()
    parts = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather([_gloo.handed(t) for t in parts], _gloo.handed(row))
    _gloo.wait_for_release()
    table = torch.stack(parts).cpu().tolist()  # per rank: index, P, first rank of its group, its layers disagree
    if local_error is not None:
        raise ValueError(local_error)
    bad = [r for r, t in enumerate(table) if t[3]]
    if bad:
        raise ValueError(f"the expert-parallel layers of rank(s) {bad} do not share one layout (see the error on "
                         "those ranks)")
    sizes = {t[1] for t in table}
    if len(sizes) > 1:
        by_size = {p: [r for r, t in enumerate(table) if t[1] == p] for p in sorted(sizes)}
        raise ValueError("the expert-parallel groups differ in size across ranks: "
                         + ", ".join(f"ep_size {p} on ranks {rs}" for p, rs in by_size.items())
                         + "; every rank needs an expert-parallel group of the same size")
    P = sizes.pop()
    members: dict[int, list[int]] = {}
    for r, t in enumerate(table):
        members.setdefault(t[2], []).append(r)
    for head, rs in members.items():
        if sorted(table[r][0] for r in rs) != list(range(P)) or rs[0] != head:
            raise ValueError(f"the expert-parallel groups do not partition the {world} ranks into groups of "
                             f"{P}: the ranks {rs} name rank {head} as the first of their group, at indices "
                             f"{[table[r][0] for r in rs]} (each group must hold the indices 0 ... {P - 1} once)")
    if P == world:
        return None
    mine = None
    for i in range(P):  # every rank creates every group, in the same order
        grp = dist.new_group([r for r, t in enumerate(table) if t[0] == i])
        if i == index:
            mine = grp
    return mine


@torch.no_grad()
def shard_experts(model: nn.Module, ep_group: Any) -> dict[str, Any]:
    """Turn every MoE layer of ``model`` that holds all its experts into an expert-parallel one over
    ``ep_group``: each rank keeps its slice ``rank*E/P ... (rank+1)*E/P - 1`` of the stacked weights.

    Every rank must start from the same weights (the same seed, or a loaded state): nothing is
    exchanged here. Call before building the optimizer and before wrapping the model in DDP.

    Returns:
        The sharded layers by name.

    Raises:
        ValueError: a layer is already expert-parallel, or its ``num_experts`` is not divisible by the
            size of ``ep_group``.
    """
    out: dict[str, Any] = {}
    if ep_group is None:
        return out
    P, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for name, layer in _layers(model).items():
        if layer.ep_size != 1:
            raise ValueError(f"layer {name!r} is already expert-parallel (ep_size={layer.ep_size})")
        if layer.num_experts % P:
            raise ValueError(f"`num_experts`={layer.num_experts} of layer {name!r} must be divisible by the "
                             f"expert-parallel size {P}")
        L = layer.num_experts // P
        ex = layer.experts
        for pname, p in list(ex.named_parameters(recurse=False)):
            setattr(ex, pname, mark_stacked(nn.Parameter(p.detach()[rank * L:(rank + 1) * L].clone(),
                                                         requires_grad=p.requires_grad)))
        ex.num_experts = L
        layer.ep_group, layer.ep_size, layer.ep_rank, layer.num_local_experts = ep_group, P, rank, L
        out[name] = layer
    return out


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every expert parameter of ``model`` (``"blocks.0.mlp.experts.w1_EFD"``)."""
    names = []
    for name, layer in _layers(model).items():
        names += [f"{_prefix(name)}experts.{pname}" for pname, _ in layer.experts.named_parameters()]
    return names


@torch.no_grad()
def reduce_expert_gradients(model: nn.Module, edp_group: Any = None, world_size: int | None = None) -> None:
    """The experts' own data-parallel reduction, for expert-parallel layers that DDP ignores.

    Sums each expert gradient over ``edp_group`` (the ranks holding the same experts; skipped when it
    has one rank or is None) and divides by ``world_size`` (default: the world): an expert's gradient on
    its owner already sums the P expert-parallel ranks' tokens (the all-to-all backward), so this gives
    the mean over the W ranks' losses that DDP gives the dense weights. Layers without expert
    parallelism are left alone (DDP averages them). Call after the backward, before the optimizer step.
    """
    W = world_size if world_size is not None else (dist.get_world_size() if dist.is_initialized() else 1)
    reduce = edp_group is not None and dist.get_world_size(edp_group) > 1
    for layer in _layers(model).values():
        if layer.ep_size == 1:
            continue
        for p in layer.experts.parameters():
            if p.grad is None:
                continue
            if reduce:
                dist.all_reduce(_gloo.handed(p.grad, edp_group), group=edp_group)
                _gloo.wait_for_release()
            p.grad.div_(W)


# ---------------------------------------------------------------------- optimizer state by global expert id


def _expert_entries(model: nn.Module) -> list[tuple[str, Any, str, nn.Parameter]]:
    return [(name, layer, pname, p) for name, layer in _layers(model).items()
            for pname, p in layer.experts.named_parameters()]


def gather_expert_stack(layer: Any, t: torch.Tensor) -> torch.Tensor:
    """The full ``[E, ...]`` stack (global expert id = index along dim 0) from every rank's ``[E/P, ...]``
    slice ``t`` of MoE layer ``layer`` (an all-gather in the layer's expert-parallel group: every rank of it
    must call this; ``t`` itself without expert parallelism). Optimizer state and sparsity masks use it.

    Raises:
        TypeError: ``layer`` is not an MoE layer (no ``ep_size``, ``ep_group``, ``num_experts``), ``t`` not a
            tensor.
        ValueError: ``t``'s first dim is not the layer's number of local experts.
    """
    if not all(hasattr(layer, a) for a in ("ep_size", "ep_group", "num_experts")):
        raise TypeError("`layer` must be an MoE layer (with ep_size, ep_group, num_experts), got "
                        f"{type(layer).__name__}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`t` must be a tensor, got {type(t).__name__}")
    local = layer.num_experts // layer.ep_size
    if t.dim() < 1 or t.shape[0] != local:
        raise ValueError(f"`t` must hold this rank's {local} experts along dim 0, got shape {tuple(t.shape)}")
    if layer.ep_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(layer.ep_size)]
    dist.all_gather([_gloo.handed(x, layer.ep_group) for x in parts], _gloo.handed(t.contiguous(), layer.ep_group),
                    group=layer.ep_group)
    _gloo.wait_for_release()
    return torch.cat(parts)


def _param_state(optimizer: torch.optim.Optimizer, p: nn.Parameter) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(p) or {}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def full_expert_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer
                                     ) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer state of every expert by global id, gathered over each layer's expert-parallel group.

    ``"<layer>.experts.<param>.<global id>" -> {state name: tensor}``: per-expert tensors (Adam's
    ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``: those of the parameter's shape) are sliced
    per expert; other tensors (Adam's ``step``) are repeated for every expert. Experts whose parameter
    has no state yet (no step taken) are absent. Every rank of each group must call it.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer, pname, p in _expert_entries(model):
        state = _param_state(optimizer, p)
        if not state:
            continue
        # sorted: every rank gathers the same entry at the same time, whatever its dict's order
        full = {k: gather_expert_stack(layer, state[k].detach()) if state[k].shape == p.shape else state[k].detach()
                for k in sorted(state)}
        for gid in range(layer.num_experts):
            out[f"{_prefix(name)}experts.{pname}.{gid}"] = {
                k: (v[gid] if state[k].shape == p.shape else v).cpu().clone() for k, v in full.items()}
    return out


@torch.no_grad()
def load_expert_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                     state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load the optimizer state of this rank's experts from a dict by global id (any expert-parallel size
    wrote it, :func:`full_expert_optimizer_state_dict`). Call after :func:`load_expert_state_dict`.

    Raises:
        ValueError: an expert this rank holds is missing while others are present, the experts of one
            parameter name different state entries, a per-expert tensor has the wrong shape, a shared
            tensor differs between experts, or a tensor is not finite (nothing is loaded then).
    """
    if not isinstance(state, dict):
        raise ValueError(f"`state` must be a dict by global expert id, got {type(state).__name__}")
    plan = []
    for name, layer, pname, p in _expert_entries(model):
        keys = [f"{_prefix(name)}experts.{pname}.{gid}" for gid in layer.local_expert_ids()]
        present = [k for k in keys if k in state]
        if not present:
            continue
        if len(present) != len(keys):
            missing = next(k for k in keys if k not in state)
            raise ValueError(f"expert optimizer state has no {missing!r} but has other experts of {pname!r}")
        entries = [state[k] for k in keys]
        if not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"expert optimizer state of {keys[0]!r}... must be dicts of tensors")
        names = list(entries[0])  # in the saved order (a set's order differs between processes)
        new: dict[str, torch.Tensor] = {}
        for k, e in zip(keys, entries):
            if set(e) != set(names):
                raise ValueError(f"expert optimizer state {k!r} has entries {sorted(e)}, expected {sorted(names)}")
            for sname, t in e.items():
                if not isinstance(t, torch.Tensor) or not torch.isfinite(t.float()).all():
                    raise ValueError(f"expert optimizer state {k!r}[{sname!r}] must be a finite tensor")
        for sname in names:
            ts = [e[sname] for e in entries]
            if ts[0].shape == p.shape[1:] and ts[0].is_floating_point():
                new[sname] = torch.stack(ts).to(device=p.device, dtype=p.dtype)
            else:
                if any(not torch.equal(t, ts[0]) for t in ts[1:]):
                    raise ValueError(f"expert optimizer state {sname!r} of {pname!r} differs between experts "
                                     f"{keys[0]!r} ... but is not a per-expert tensor of shape {tuple(p.shape[1:])}")
                new[sname] = ts[0].clone()
        plan.append((p, new))
    for p, new in plan:
        optimizer.state[p] = new


def _param_index(optimizer: torch.optim.Optimizer | Sequence[nn.Parameter]) -> dict[int, int]:
    """``id(param) -> index`` in ``optimizer.state_dict()`` (the order of the param groups), or in the
    given sequence of the optimizer's parameters (before the optimizer exists)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        params = list(optimizer)
    return {id(p): i for i, p in enumerate(params)}


def globalize_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """In ``optimizer_state`` (``optimizer.state_dict()`` of this rank), replace every expert-parallel
    parameter's per-expert tensors by the full ``[E, ...]`` stacks (global expert id = index along dim 0),
    gathered over the expert-parallel group: the state then loads at any expert-parallel size through
    :func:`localize_optimizer_state`. Collective: every rank of each group must call it. Returns it."""
    index = _param_index(optimizer)
    for _, layer, _, p in _expert_entries(model):
        i = index.get(id(p))
        entry = optimizer_state["state"].get(i) if i is not None else None
        if layer.ep_size == 1 or entry is None:
            continue
        # a new dict: ``optimizer.state_dict()`` shares its per-parameter dicts with the live state
        optimizer_state["state"][i] = {k: gather_expert_stack(layer, entry[k]) if isinstance(entry[k], torch.Tensor)
                                       and entry[k].shape == p.shape else entry[k] for k in sorted(entry)}
    return optimizer_state


def localize_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[nn.Parameter],
                             optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The reverse of :func:`globalize_optimizer_state` before ``optimizer.load_state_dict``: every expert
    parameter's tensors of the full ``[E, ...]`` shape are cut to this rank's slice. Returns it.

    ``optimizer`` may also be the sequence of its parameters in order (when it does not exist yet).

    Raises:
        ValueError: a per-expert tensor has neither the full nor the local shape.
    """
    index = _param_index(optimizer)
    for name, layer, pname, p in _expert_entries(model):
        i = index.get(id(p))
        entry = optimizer_state.get("state", {}).get(i) if i is not None else None
        if entry is None:
            continue
        full_shape = (layer.num_experts, *p.shape[1:])
        for k, v in list(entry.items()):
            if not isinstance(v, torch.Tensor) or v.dim() != p.dim():
                continue
            if tuple(v.shape) == full_shape:
                ids = layer.local_expert_ids()
                entry = optimizer_state["state"][i] = dict(entry)
                entry[k] = v[ids.start:ids.stop].clone()
            elif v.shape != p.shape:
                raise ValueError(f"optimizer state {k!r} of {_prefix(name)}experts.{pname} has shape "
                                 f"{tuple(v.shape)}, expected {full_shape} (all experts) or {tuple(p.shape)}")
    return optimizer_state
