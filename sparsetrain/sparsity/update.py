"""One mask update of every sparsified layer, the layers alike selected together.

A RigL, SET or GMP update of many layers applies the pure per-layer functions of :mod:`.rigl`,
:mod:`.set` and :mod:`.gmp` to each layer. Layers of one shape, dtype, device, active count and
selection size form a group that is selected in one pass (one ``topk`` for all the attention
projections of a transformer, say): the rows of the ``_rows`` functions. The masks are those of
the per-layer functions, because selections are exact (:mod:`.masks`). On the CPU, where the
update is bound by memory traffic and a group's stacked copies cost more than the operations they
save, layers are updated one by one (``group_on_cpu=False``).

Everything here takes explicit tensors and dictionaries; the state (masks, counts, generators)
belongs to :class:`~sparsetrain.sparsity.DynamicSparsifier`, which calls these in order:
:func:`group_layers`, :func:`reduced_dense_grads` (RigL) or :func:`growth_scores` (SET),
:func:`update_groups`, then :func:`host_ints` once for every count.

Shape suffixes: ``L`` layers of one group (rows), ``N`` positions of one flattened layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .. import _gloo
from .gmp import _prune_rows
from .rigl import _rigl_rows
from .set import _draw_growth_scores, _set_rows

__all__ = ["GroupKey", "group_layers", "growth_scores", "host_ints", "nonfinite", "reduced_dense_grads",
           "stack_rows", "update_groups"]

#: ``(shape, dtype, device, active count, selection size, layer name or None)``: layers with equal keys are
#: updated together (the name is set for a layer updated alone).
GroupKey = tuple[Any, ...]


def host_ints(values: list[torch.Tensor]) -> list[int]:
    """Integer tensors (0-dim or 1-D) as one flat list of Python ints, in order, with one
    device-to-host copy per device (not one per tensor)."""
    out: list[list[int]] = [[] for _ in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        flat = torch.cat([values[i].reshape(-1) for i in idx]).tolist()
        start = 0
        for i in idx:
            n = values[i].numel()
            out[i] = [int(x) for x in flat[start:start + n]]
            start += n
    return [x for part in out for x in part]


@torch.no_grad()
def nonfinite(weights: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity, in order.

    One ``torch._foreach_norm(..., inf)`` per device (the largest ``|w|`` of every tensor, NaN where
    one is NaN: a multi-tensor kernel for all of them on an accelerator) and one device-to-host copy
    of those few numbers, instead of a ``torch.isfinite(w).all()`` (several full passes and kernel
    launches) per tensor. The largest magnitude never overflows, so a finite tensor is never
    reported, whatever its dtype.
    """
    by_device: dict[torch.device, list[str]] = {}
    for name, w in weights.items():
        by_device.setdefault(w.device, []).append(name)
    bad = set()
    for names in by_device.values():
        peaks = torch.stack(torch._foreach_norm([weights[n] for n in names], float("inf"))).tolist()
        bad.update(n for n, peak in zip(names, peaks) if not math.isfinite(peak))
    return [name for name in weights if name in bad]


def stack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Same-shaped tensors as the rows of one ``[len(tensors), numel]`` tensor (a view for one
    contiguous tensor, else a new tensor)."""
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].view(1, -1)
    return torch.stack(tensors).view(len(tensors), -1)


def group_layers(weights: dict[str, torch.Tensor], active: dict[str, int], counts: dict[str, int], *,
                 group_on_cpu: bool) -> dict[GroupKey, list[str]]:
    """Layers that can be updated together, in registration order.

    Args:
        weights: layer name -> weight.
        active: layer name -> active positions now.
        counts: layer name -> positions the layer drops (RigL, SET) or keeps (GMP).
        group_on_cpu: group CPU layers too (else each CPU layer is a group of its own).
    """
    groups: dict[GroupKey, list[str]] = {}
    for name, w in weights.items():
        alone = name if w.device.type == "cpu" and not group_on_cpu else None
        key = (tuple(w.shape), w.dtype, w.device, active[name], counts[name], alone)
        groups.setdefault(key, []).append(name)
    return groups


@torch.no_grad()
def reduced_dense_grads(groups: dict[GroupKey, list[str]], weights: dict[str, torch.Tensor],
                        dense_grads: dict[str, torch.Tensor], *, process_group: Any = None,
                        all_reduce: bool = True) -> dict[GroupKey, torch.Tensor]:
    """Each group's captured dense gradients as ``[layers, positions]``, averaged over the ranks.

    Args:
        groups: from :func:`group_layers`.
        weights: layer name -> weight (for the zeros of a layer that took no part in the backward).
        dense_grads: layer name -> captured dense gradient; emptied here.
        process_group: the group to average over.
        all_reduce: average over the ranks (False when something averaged them already).
    """
    grads = {}
    for key, names in groups.items():
        rows = []
        for name in names:
            g = dense_grads.pop(name, None)
            if g is None:  # the layer took no part in this step's backward
                g = torch.zeros_like(weights[name])
            rows.append(g)
        grads[key] = stack_rows(rows)
    dense_grads.clear()
    world = dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1
    if world > 1 and all_reduce:
        works = [dist.all_reduce(_gloo.handed(g, process_group), group=process_group, async_op=True)
                 for g in grads.values()]
        for w in works:
            w.wait()
        works = w = None  # a work holds what it was handed
        _gloo.wait_for_release()
        for g in grads.values():
            g.div_(world)
    return grads


def _device_generator(device: torch.device, generators: dict[torch.device, torch.Generator | None]
                      ) -> torch.Generator | None:
    """A generator on ``device`` for SET's growth scores (made once, kept in ``generators``), or
    ``None`` to draw them on the CPU."""
    if device.type == "cpu":
        return None
    if device not in generators:
        try:
            generators[device] = torch.Generator(device=device)
        except (RuntimeError, TypeError):  # no generator of this device type: draw on the CPU
            generators[device] = None
    return generators[device]


@torch.no_grad()
def growth_scores(groups: dict[GroupKey, list[str]], weights: dict[str, torch.Tensor], generator: torch.Generator,
                  device_generators: dict[torch.device, torch.Generator | None],
                  own_generators: dict[str, torch.Generator] | None = None) -> dict[GroupKey, torch.Tensor]:
    """SET's random growth scores of each group that regrows, as ``[layers, positions]``.

    Drawn layer by layer in the order of ``weights`` (so grouping does not change which numbers a
    layer gets). On the CPU from ``generator``; on an accelerator, from a generator of that device
    (kept in ``device_generators``) reseeded before each layer with a number drawn from
    ``generator``, so the state of ``generator`` still determines every draw, on every rank alike.
    A layer named in ``own_generators`` (an expert slice, whose draw must not depend on the other
    layers) takes its generator from there instead, and leaves ``generator`` untouched.
    """
    own_generators = own_generators or {}
    scores: dict[GroupKey, torch.Tensor] = {}
    where: dict[str, tuple[torch.Tensor, int]] = {}
    for key, names in groups.items():
        if key[4] == 0:  # nothing dropped, nothing drawn
            continue
        w = weights[names[0]]
        scores[key] = torch.empty(len(names), w.numel(), device=w.device)
        where.update((name, (scores[key], i)) for i, name in enumerate(names))
    for name in weights:
        if name not in where:
            continue
        out_LN, i = where[name]
        source = own_generators.get(name, generator)
        device_generator = _device_generator(out_LN.device, device_generators)
        if device_generator is None:
            device_generator = source
        else:
            device_generator.manual_seed(int(torch.randint(2**62, (), generator=source)))
        _draw_growth_scores(out_LN[i], device_generator)
    return scores


@torch.no_grad()
def update_groups(method: str, groups: dict[GroupKey, list[str]], weights: dict[str, torch.Tensor],
                  masks: dict[str, torch.Tensor], ever_active: dict[str, torch.Tensor], active: dict[str, int],
                  grads: dict[GroupKey, torch.Tensor], scores: dict[GroupKey, torch.Tensor]
                  ) -> tuple[list[torch.Tensor], list[list[str]]]:
    """Update the masks of every group in place; nothing here waits for the device.

    Args:
        method: ``"rigl"``, ``"set"`` or ``"gmp"``.
        groups: from :func:`group_layers` (the selection size: positions dropped, or kept by GMP).
        weights: layer name -> weight.
        masks: layer name -> mask, overwritten with the new mask.
        ever_active: layer name -> positions ever active, or-ed with the new mask (moved to the
            mask's device if needed).
        active: layer name -> active count, updated for GMP (RigL and SET keep it).
        grads: RigL's dense gradients per group (:func:`reduced_dense_grads`).
        scores: SET's growth scores per group (:func:`growth_scores`).

    Returns:
        ``(counted, changed)``: per group whose masks changed, in order, the names of its layers in
        ``changed`` and two integer tensors in ``counted`` (per layer: connections grown that were
        inactive before, positions active for the first time); read them with :func:`host_ints`.
    """
    counted: list[torch.Tensor] = []
    changed: list[list[str]] = []
    targets: list[torch.Tensor] = []  # tensors of grouped layers to overwrite, and their new values
    values: list[torch.Tensor] = []
    for key, names in groups.items():
        shape, n_active, k = key[0], key[3], key[4]
        if method == "gmp":
            for name in names:
                active[name] = min(k, n_active)
        if (k >= n_active) if method == "gmp" else (k == 0):  # nothing pruned or dropped: the mask stays
            continue
        layer_masks = [masks[n] for n in names]
        mask_LN = stack_rows(layer_masks)
        weight_LN = stack_rows([weights[n].detach() for n in names])
        if method == "rigl":
            new_LN = _rigl_rows(weight_LN, grads[key], mask_LN, k, n_active)
        elif method == "set":
            new_LN = _set_rows(weight_LN, mask_LN, scores[key], k, n_active)
        else:
            new_LN = _prune_rows(weight_LN, mask_LN, k, n_active)
        evers = []
        for name, mask in zip(names, layer_masks):
            ever = ever_active[name]
            if ever.device != mask.device:
                ever = ever_active[name] = ever.to(mask.device)
            evers.append(ever)
        ever_LN = stack_rows(evers)
        grown_LN = new_LN & ~mask_LN
        first_LN = grown_LN & ~ever_LN
        if len(names) == 1:  # mask_LN and ever_LN are views of the layer's own tensors
            counted += [torch.count_nonzero(grown_LN), torch.count_nonzero(first_LN)]
            mask_LN.copy_(new_LN)
            ever_LN |= new_LN
        else:
            counted += [torch.count_nonzero(grown_LN, dim=1), torch.count_nonzero(first_LN, dim=1)]
            targets += layer_masks + evers
            values += [r.view(shape) for r in new_LN.unbind(0)]
            values += [r.view(shape) for r in (ever_LN | new_LN).unbind(0)]
        changed.append(names)
    if targets:
        torch._foreach_copy_(targets, values)
    return counted, changed
