"""Stacked ``[E, ...]`` weights (MoE expert stacks) under dynamic sparsity: every expert slice is a layer.

Legend: E experts (the stacked dimension), ``...`` one expert's weight shape (``F x D`` for ``w1_EFD``).

A stacked ``[E, F, D]`` weight holds E independent ``F x D`` matrices. Read as one 3-D tensor, an
Erdős–Rényi-Kernel density would count E as a fan dimension (``(E + F + D) / (E F D)``: the same
experts would get another density in a stack of 4 than in a stack of 8, 1.8x at F=24, D=16) and a top-k
over the whole stack would let one expert's large weights or gradients take the places of the
others. Here every expert slice is a layer of its own: its ERK score is that of an ``F x D`` matrix,
its active count is its own, and RigL / SET / magnitude updates select within the slice. The pure
functions of this package (``layer_active_counts``, ``random_mask``, ``rigl_update``, ``set_update``)
do the work, one slice at a time.

Which parameters are stacks: a parameter marked with the attribute :data:`STACKED_ATTR` set to True
(``sparsetrain.moe.GroupedExperts`` marks ``w1_EFD``, ``w2_EDF``, ``w3_EFD`` and its biases; gradient
compression reads the same mark) with at least 3 dimensions. :func:`select_stacks` picks them by their
qualified parameter name (``"blocks.0.mlp.experts.w1_EFD"``) with the ``include`` / ``exclude`` globs
of :class:`~sparsetrain.sparsity.DynamicSparsifier`, which masks them per slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import contract
from .density import layer_active_counts, layer_densities
from .masks import random_mask
from .rigl import rigl_update
from .set import set_update

__all__ = ["STACKED_ATTR", "expert_active_counts", "expert_densities", "expert_generator", "expert_random_masks",
           "expert_slice_shapes", "select_stacks", "stacked_candidates", "update_expert_masks"]

#: The attribute that marks a stacked ``[E, ...]`` parameter (the same name as
#: ``sparsetrain.compression.dgc.STACKED_ATTR``; a test holds them equal).
STACKED_ATTR = "_sparsetrain_stacked"


def _root(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def stacked_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Qualified parameter name -> ``(owning module, attribute)`` of every stacked parameter of at least 3
    dimensions (the expert weights, not the ``[E, F]`` biases), in registration order."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for mname, module in _root(model).named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if getattr(p, STACKED_ATTR, False) and p.dim() >= 3:
                out[f"{mname}.{attr}" if mname else attr] = (module, attr)
    return out


def select_stacks(model: nn.Module, include: Sequence[str] | None,
                  exclude: Sequence[str] = ()) -> tuple[dict[str, tuple[nn.Module, str]], list[str], list[str]]:
    """The stacked parameters that ``include`` / ``exclude`` select, and the patterns left for the layers.

    A stack is selected only when ``include`` is given and one of its globs matches the stack's
    qualified parameter name (``"*.experts.w1_EFD"``, ``"blocks.0.mlp.experts.*"``); ``exclude`` then
    removes matching ones. The default ``include=None`` (every Linear / Conv) leaves stacks dense.

    Returns:
        ``(stacks, include_rest, exclude_rest)``: the selected stacks (name -> (module, attribute)),
        and the patterns that match no stack, to be applied to the modules
        (:func:`sparsetrain.contract.select_layers`); a pattern matching a stack is not passed on.
    """
    candidates = stacked_candidates(model)
    include_rest = [p for p in include or () if not any(contract.matches(n, (p,)) for n in candidates)]
    exclude_rest = [p for p in exclude if not any(contract.matches(n, (p,)) for n in candidates)]
    if include is None:
        return {}, include_rest, exclude_rest
    chosen = {n: c for n, c in candidates.items() if contract.matches(n, include) and not contract.matches(n, exclude)}
    return chosen, include_rest, exclude_rest


def expert_slice_shapes(shapes: Mapping[str, Sequence[int]], stacked: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``shapes`` with every stacked name ``n`` of shape ``[E, ...]`` replaced by E entries ``"n.<e>"`` of
    shape ``[...]`` (in order), the other names kept.

    Raises:
        ValueError: a stacked name is not in ``shapes``, or its slices have fewer than 2 dimensions.
    """
    stacked = set(stacked)
    unknown = sorted(stacked - set(shapes))
    if unknown:
        raise ValueError(f"`stacked` names {unknown} are not in `shapes`")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if name in stacked:
            if len(shape) < 3:
                raise ValueError(f"`shapes[{name!r}]` must be [E, ...] with slices of >= 2 dimensions, got {shape}")
            out.update({f"{name}.{e}": shape[1:] for e in range(shape[0])})
        else:
            out[name] = shape
    return out


def expert_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk",
                     stacked: Iterable[str] = ()) -> dict[str, float]:
    """:func:`~sparsetrain.sparsity.layer_densities` with every stacked weight read as its E slices; a
    stacked name gets its slices' density (the same for every slice: they have one shape)."""
    stacked = set(stacked)
    per = layer_densities(expert_slice_shapes(shapes, stacked), sparsity, distribution)
    return {name: per[f"{name}.0"] if name in stacked else per[name] for name in shapes}


def expert_active_counts(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk",
                         stacked: Iterable[str] = ()) -> dict[str, int | list[int]]:
    """:func:`~sparsetrain.sparsity.layer_active_counts` with every stacked weight read as its E slices: a
    stacked name gets one count per expert (they may differ by one, from the exact rounding of the total)."""
    stacked = set(stacked)
    per = layer_active_counts(expert_slice_shapes(shapes, stacked), sparsity, distribution)
    return {name: [per[f"{name}.{e}"] for e in range(int(shape[0]))] if name in stacked else per[name]
            for name, shape in shapes.items()}


def _check_counts(name: str, counts: Sequence[int], E: int) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != E:
        raise ValueError(f"`{name}` must hold one count per expert ({E}), got {len(counts)}")
    return counts


def expert_generator(seed: int, stack: str, expert: int, *salt: int) -> torch.Generator:
    """A CPU generator for expert ``expert`` (its GLOBAL id) of stack ``stack``, seeded from ``seed``,
    the names and ``salt`` (e.g. the step of a mask update) by a stable hash.

    What is drawn from it for one expert depends on nothing else: not on the expert-parallel size, not
    on which rank holds the expert, not on the other layers. That makes the random masks of an expert
    the same on every replica and at every expert-parallel size.
    """
    text = "\x00".join(str(x) for x in (int(seed), stack, int(expert), *(int(s) for s in salt)))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def expert_random_masks(shape: Sequence[int], counts: Sequence[int],
                        generator: torch.Generator | Sequence[torch.Generator],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask of ``shape = [E, ...]`` whose slice e has exactly ``counts[e]`` random active positions
    (:func:`~sparsetrain.sparsity.random_mask` per slice): drawn in expert order from ``generator``, or
    slice e from ``generator[e]`` when one generator per expert is given (:func:`expert_generator`).

    Raises:
        ValueError: ``counts`` or ``generator`` does not hold E entries, or a count is outside [0, slice size].
    """
    shape = tuple(int(d) for d in shape)
    counts = _check_counts("counts", counts, shape[0])
    gens = [generator] * shape[0] if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"`generator` must be one generator or one per expert ({shape[0]}), got {len(gens)}")
    return torch.stack([random_mask(shape[1:], c, g, device) for c, g in zip(counts, gens)])


@torch.no_grad()
def update_expert_masks(method: str, weight: torch.Tensor, mask: torch.Tensor, n_drop: Sequence[int], *,
                        grad: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One RigL or SET update of a stacked weight, every expert slice on its own.

    Args:
        method: ``"rigl"`` (drop the smallest |W|, grow by the dense |grad|) or ``"set"`` (grow at random).
        weight: the stacked ``[E, ...]`` weight.
        mask: its bool mask, same shape.
        n_drop: connections each expert replaces (its own share: E entries).
        grad: the dense gradient (RigL).
        generator: the random growth's generator (SET); one draw per expert, in expert order.

    Returns:
        The new mask: slice e is ``rigl_update`` / ``set_update`` of slice e (each keeps its active count).

    Raises:
        ValueError: an unknown method, mismatched shapes, ``n_drop`` without E entries, a missing ``grad``
            (RigL) or ``generator`` (SET).
    """
    if method not in ("rigl", "set"):
        raise ValueError(f"`method` must be 'rigl' or 'set', got {method!r}")
    if weight.shape != mask.shape or weight.dim() < 3:
        raise ValueError(f"`weight` and `mask` must share one [E, ...] shape of >= 3 dimensions, got "
                         f"{tuple(weight.shape)} and {tuple(mask.shape)}")
    n_drop = _check_counts("n_drop", n_drop, weight.shape[0])
    if method == "rigl":
        if grad is None or grad.shape != weight.shape:
            raise ValueError(f"`grad` of shape {tuple(weight.shape)} is needed for RigL, got "
                             f"{None if grad is None else tuple(grad.shape)}")
        return torch.stack([rigl_update(weight[e], grad[e], mask[e], n) for e, n in enumerate(n_drop)])
    if generator is None:
        raise ValueError("`generator` is needed for SET")
    return torch.stack([set_update(weight[e], mask[e], n, generator) for e, n in enumerate(n_drop)])


def select_layers_and_stacks(model: nn.Module, *, include: Sequence[str] | None, exclude: Sequence[str],
                             module_types: Sequence[type[nn.Module]], keep_first_dense: bool = False,
                             keep_last_dense: bool = False
                             ) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, str]]]:
    """The modules whose ``weight`` and the stacked parameters that dynamic sparsity masks.

    One glob rule for both (``fnmatch.fnmatchcase``, :func:`sparsetrain.contract.matches`): modules by
    qualified module name (:func:`sparsetrain.contract.select_layers`, with ``keep_first_dense`` /
    ``keep_last_dense`` applying to them), stacks by qualified parameter name (:func:`select_stacks`:
    only when ``include`` names them). Each pattern must match a module or a stack.

    Returns:
        ``(layers, stacks)``: module name -> module; stack name -> ``(owning module, attribute)``.

    Raises:
        ValueError: a pattern matches neither a module nor a stack (naming both lists), or nothing is
            selected.
    """
    stack_names = list(stacked_candidates(model))
    try:
        plain = list(contract.select_layers(model, module_types=module_types))
    except ValueError:  # no candidate module at all
        plain = []
    include_plain: list[str] | None = None if include is None else []
    exclude_plain: list[str] = []
    for arg, patterns, keep in (("include", include or (), include_plain), ("exclude", exclude, exclude_plain)):
        for p in patterns:
            in_plain = any(contract.matches(n, (p,)) for n in plain)
            if not in_plain and not any(contract.matches(n, (p,)) for n in stack_names):
                shown = ", ".join(plain[:8]) + (", ..." if len(plain) > 8 else "")
                stacks = ", ".join(stack_names[:4]) + (", ..." if len(stack_names) > 4 else "")
                raise ValueError(f"`{arg}` pattern {p!r} matches no layer that can be sparsified; layers: "
                                 f"{shown or '(none)'}; expert stacks (by parameter name): {stacks or '(none)'}")
            if in_plain:
                keep.append(p)
    stacks, _, _ = select_stacks(model, include, exclude)
    layers: dict[str, nn.Module] = {}
    if include_plain is None or include_plain:
        try:
            layers = contract.select_layers(model, include=include_plain, exclude=exclude_plain,
                                            module_types=module_types, keep_first_dense=keep_first_dense,
                                            keep_last_dense=keep_last_dense)
        except ValueError:
            if not stacks:  # only "no layer left" can come from here: the patterns were checked above
                raise
    if not layers and not stacks:
        raise ValueError("no layer left to sparsify: check `include`, `exclude`, `keep_first_dense`, "
                         f"`keep_last_dense` (layers: {', '.join(plain) or 'none'}; expert stacks: "
                         f"{', '.join(stack_names) or 'none'})")
    return layers, stacks


def expert_parallel_layer(model: nn.Module, stack: str) -> Any:
    """The expert-parallel layer that holds stack ``stack``, or None where the stack is not expert-parallel.

    That is the owning module's parent when its ``ep_size`` is an int > 1: a ``sparsetrain.moe.MoE``, read
    through its public attributes ``ep_size``, ``ep_group``, ``num_experts`` and ``local_expert_ids()``.
    """
    parent = ".".join(stack.split(".")[:-2])
    layer = dict(_root(model).named_modules()).get(parent)
    size = getattr(layer, "ep_size", 1) if layer is not None else 1
    return layer if isinstance(size, int) and not isinstance(size, bool) and size > 1 else None


def stack_active_counts(shapes: Mapping[str, Sequence[int]], stacked: Iterable[str], sparsity: float,
                        distribution: str) -> dict[str, int | list[int]]:
    """:func:`expert_active_counts` with ``sparsity`` 0 meaning every position (GMP's start)."""
    if sparsity == 0.0:
        stacked = set(stacked)
        return {n: [int(torch.Size(s[1:]).numel())] * int(s[0]) if n in stacked else int(torch.Size(s).numel())
                for n, s in shapes.items()}
    return expert_active_counts(shapes, sparsity, distribution, stacked=stacked)


def resolve_expert_group(sharded: Mapping[str, Any], expert_group: Any, world: int) -> Any:
    """The expert-data-parallel group of a sparsifier's expert-parallel stacks (``sharded``: stack -> its
    MoE layer) in a ``process_group`` of ``world`` ranks: ``expert_group`` checked (its size must be
    world / ``ep_size``), or, when None, derived from the layers' own expert-parallel groups
    (:func:`sparsetrain.moe.derive_expert_data_parallel_group`: collective over the default group, which
    must then be the world of ``process_group``); None when each expert has one rank.

    Raises:
        TypeError: ``expert_group`` is neither a ``ProcessGroup`` nor None.
        ValueError: an ``ep_size`` that does not divide ``world``, an ``expert_group`` of the wrong size, or
            replicas to derive over a ``process_group`` smaller than the default group.
    """
    if expert_group is not None and not (dist.is_available() and isinstance(expert_group, dist.ProcessGroup)):
        raise TypeError(f"`expert_group` must be a torch.distributed ProcessGroup or None, got "
                        f"{type(expert_group).__name__}")
    if not sharded:
        return expert_group
    for name, layer in sharded.items():
        if world % int(layer.ep_size):
            raise ValueError(f"expert stack {name!r} is expert-parallel (ep_size={layer.ep_size}), which does not "
                             f"divide the world size {world} of `process_group`")
    if expert_group is not None:
        for name, layer in sharded.items():
            replicas, size = world // int(layer.ep_size), dist.get_world_size(expert_group)
            if size != replicas:
                raise ValueError(f"`expert_group` has {size} ranks, but the experts of stack {name!r} have {replicas} "
                                 f"replicas (world {world} / ep_size {layer.ep_size})")
        return expert_group
    if world == 1:
        return None
    if world != dist.get_world_size():
        replicated = {n: m for n, m in sharded.items() if int(m.ep_size) < world}
        if not replicated:
            return None
        name, layer = next(iter(replicated.items()))
        raise ValueError(
            f"expert stack {name!r} is expert-parallel (ep_size={layer.ep_size}) and `process_group` has "
            f"{world} of the {dist.get_world_size()} ranks: the expert-data-parallel group is derived over the "
            "default group only; pass `expert_group`, the ranks of `process_group` holding the same experts"
        )
    from ..moe.parallel import derive_expert_data_parallel_group  # the moe package imports this one

    return derive_expert_data_parallel_group(sharded)
