"""How an N:M sparse layer's forward pass sees its masked weight: three strategies, one interface.

An :class:`~sparsetrain.nm.NMSparsifier` picks one at construction from its config
(:func:`strategy_for`) and never tests the mode again:

- :class:`Parametrized` (the default): an :class:`~sparsetrain.nm.NMMask` parametrization on each
  ``weight``; the forward pass computes ``W ⊙ M`` (MDGF: ``W ⊙ (M + (1 − M) β)``) from the dense
  ``W``, SR-STE's term is a gradient hook on ``W``; the masks are recomputed after the optimizer
  step.
- :class:`ForwardMasks` (``masks_in_forward=True``): the same parametrization, computing ``M`` from
  ``W`` inside the forward pass (it fuses into the weight's kernel under ``torch.compile``); the
  stored masks are refreshed on demand.
- :class:`InPlace` (``inplace=True``): no parametrization; the plain ``weight`` parameter holds the
  masked weight between optimizer steps, the dense one waits in a copy beside it and is put back
  before each optimizer step.

The model's state-dict keys of a sparse layer's weight (``docs/nm_sparsity.md``):

- :class:`Parametrized` and :class:`ForwardMasks`: ``<layer>.parametrizations.weight.original``
  (the dense weight); a plain ``<layer>.weight`` (a dense checkpoint) loads into it.
- :class:`InPlace`: ``<layer>.weight``, holding the dense weight also while the layer holds the
  masked one; a ``<layer>.parametrizations.weight.original`` checkpoint loads into it.

The masks themselves, the schedule and the statistics belong to the sparsifier; a strategy reads
them through its owner (``owner.params``: layer name -> :class:`~sparsetrain.nm.NMMask` holding
the mask, ``owner.schedule``) and asks it to recompute them (``owner.recompute_masks``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import _fast_weight, grouped
from .config import NMConfig
from .methods import NMMask

if TYPE_CHECKING:
    from .sparsifier import NMSparsifier

__all__ = ["ForwardMasks", "InPlace", "MaskingStrategy", "Parametrized", "strategy_for"]


class MaskingStrategy:
    """The interface every masking mode implements (see the module's table).

    The hooks of one training step, in order: :meth:`before_optimizer_step` (after the backward
    passes), ``optimizer.step()``, :meth:`check_step`, the schedule advances,
    :meth:`apply_schedule`, :meth:`step` (recompute the masks when due, then :meth:`mask`).

    Args:
        owner: the sparsifier.
    """

    #: The name users choose it by (``NMConfig`` field), for messages and ``repr``.
    name: ClassVar[str] = ""
    #: The key suffix of a sparse layer's weight in the model's state dict.
    weight_key: ClassVar[str] = "weight"
    #: Whether the stored masks lag the weights (the owner's ``recompute_masks`` clears it).
    stale = False

    def __init__(self, owner: NMSparsifier) -> None:
        self.owner = owner
        self.modules = list(owner.layers.values())
        self.hooks: list[Any] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- attaching and removing
    @classmethod
    def check(cls, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Refuse layers this mode cannot take (before anything is registered).

        Raises:
            ValueError: naming the layer.
        """
        for name, mod in layers.items():
            if parametrize.is_parametrized(mod, "weight"):
                raise ValueError(f"layer {name!r} already has a parametrized `weight` (is N:M sparsity attached "
                                 f"twice?); N:M needs the plain weight")

    def attach(self) -> None:
        """Register what the mode needs on every layer (the masks are computed after)."""
        raise NotImplementedError

    def release(self) -> None:
        """Remove everything :meth:`attach` registered; each layer keeps a plain ``weight``
        parameter (the tensor the optimizer holds) with its dense values."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # ---------------------------------------------------------------- weights
    def dense_weight(self, i: int) -> torch.Tensor:
        """The live dense weight (the trained parameter) of the ``i``-th layer."""
        raise NotImplementedError

    def dense_weights(self) -> list[torch.Tensor]:
        """Every layer's :meth:`dense_weight`, in layer order."""
        return [self.dense_weight(i) for i in range(len(self.modules))]

    # ---------------------------------------------------------------- around the optimizer step
    def before_optimizer_step(self) -> None:
        """After the backward pass(es), before ``optimizer.step()``."""

    def check_step(self) -> None:
        """At the start of the sparsifier's ``step()``: refuse a step the mode cannot take."""

    @torch.no_grad()
    def apply_schedule(self, beta: float, lambda_w: float) -> None:
        """Hand the schedule's values to the layers' :class:`NMMask` (on a change only: a module's
        ``__setattr__`` is not free, and this runs for every layer at every step)."""
        for p in self.owner.params.values():
            if p.beta != beta or p.lambda_w != lambda_w:
                p.beta, p.lambda_w = beta, lambda_w

    @torch.no_grad()
    def step(self, changed: bool) -> None:
        """After the schedule advanced: recompute the masks when due (``update_every``, or a pattern
        change, whose flips are not counted), check ranks every ``verify_every`` updates, mask."""
        owner, schedule = self.owner, self.owner.schedule
        if changed or schedule.due:
            owner.recompute_masks(count_flips=not changed)
            schedule.updates += 1
            k = owner.config.verify_every
            if k and schedule.updates % k == 0:
                owner.check_ranks()
        self.mask()

    # ---------------------------------------------------------------- masking the weights themselves
    def mask(self) -> None:
        """Make the layers compute with the masked weights (in-place masking); else nothing."""

    def unmask(self, decay: bool) -> None:
        """Put the dense weights back (in-place masking), with ``decay`` adding SR-STE's term to
        their gradients; else nothing."""

    # ---------------------------------------------------------------- the stored masks
    def refresh_stored(self) -> None:
        """Bring the stored masks up to date with the weights where they may lag."""

    def after_load(self) -> None:
        """After the sparsifier loaded a state (the stored masks are current), before its rank check."""

    def resume(self) -> None:
        """Last in the sparsifier's ``load_state_dict``: go on as before the load."""


class Parametrized(MaskingStrategy):
    """An :class:`NMMask` parametrization on each weight, with the masks computed after each
    optimizer step (the default)."""

    name = "parametrization"
    weight_key = "parametrizations.weight.original"

    def attach(self) -> None:
        owner = self.owner
        for name, mod in owner.layers.items():
            p = owner.params[name]
            parametrize.register_parametrization(mod, "weight", p, unsafe=True)
            _fast_weight.install(mod)
            self.hooks.append(mod.register_load_state_dict_pre_hook(_accept_plain_weight))
            if owner.config.lambda_w:  # SR-STE's term (any method may set lambda_w)
                w = _fast_weight.dense_weight(mod)
                self.hooks.append(w.register_hook(functools.partial(p.decay_gradient, w)))

    def release(self) -> None:
        super().release()
        for mod in self.modules:
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)

    def dense_weight(self, i: int) -> torch.Tensor:
        return _fast_weight.dense_weight(self.modules[i])

    def dense_weights(self) -> list[torch.Tensor]:
        return [_fast_weight.dense_weight(mod) for mod in self.modules]


class ForwardMasks(Parametrized):
    """The parametrization, computing each mask from its weight inside the forward pass
    (``masks_in_forward``). The stored masks (statistics, rank checks, checkpoints, export) are
    refreshed when read and around every ``verify_every``-th step."""

    name = "masks_in_forward"

    def attach(self) -> None:
        super().attach()
        self.set_pattern()

    def set_pattern(self) -> None:
        pattern = self.owner.schedule.pattern
        for p in self.owner.params.values():
            if p.nm != pattern:
                p.nm = pattern

    @torch.no_grad()
    def step(self, changed: bool) -> None:
        """The forward pass computes the masks; the stored ones are refreshed at the step before
        every ``verify_every``-th (without counting flips) and at it (counting the flips of that one
        step, then checking ranks)."""
        owner = self.owner
        self.set_pattern()
        owner.schedule.updates += 1
        self.stale = True
        owner.mask_version += 1  # the forward pass computes new masks from the new weights
        t, k = owner.schedule.step, owner.config.verify_every
        if changed:
            owner.recompute_masks(count_flips=False)
        elif k and t % k == 0:
            owner.recompute_masks(count_flips=True)
            owner.check_ranks()
        elif k and (t + 1) % k == 0:
            owner.recompute_masks(count_flips=False)

    @torch.no_grad()
    def refresh_stored(self) -> None:
        if self.stale:
            self.owner.recompute_masks(count_flips=False)

    def after_load(self) -> None:
        self.stale = False
        self.set_pattern()


class InPlace(MaskingStrategy):
    """The layers' own ``weight`` parameters masked in place between optimizer steps (``inplace``).

    After each optimizer step the dense weights are copied aside and the weights masked (one
    Triton launch for all layers on CUDA); before the next optimizer step they are put back, with
    SR-STE's term added to the gradients in the same launch. The model's ``state_dict()`` gives the
    dense weights and ``load_state_dict()`` takes dense weights also while masked.
    """

    name = "inplace"
    weight_key = "weight"

    def __init__(self, owner: NMSparsifier) -> None:
        super().__init__(owner)
        # (the weights' addresses, their dense values while masked)
        self.shadows: tuple[tuple[int, ...], list[torch.Tensor]] | None = None
        self.swapped = False  # the weights hold their masked values now
        self.armed = False  # masked at least once (attached with verify_now, or refresh())
        self.flat: tuple | None = None  # on CUDA: (first, last pruned mask, their flat buffer)

    @classmethod
    def check(cls, model: nn.Module, layers: dict[str, nn.Module]) -> None:
        """Also refuse a sparse weight that another module shares: the parameter itself is masked."""
        super().check(model, layers)
        owners: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        for name, mod in layers.items():
            names = owners.get(id(mod.weight), [])
            if len(names) > 1:
                raise ValueError(f"`inplace` masks the weight parameter itself, but layer {name!r} shares it "
                                 f"({', '.join(names)}); use inplace=False or exclude the layer")

    def attach(self) -> None:  # the NMMask only holds the masks
        for i, mod in enumerate(self.modules):
            self.hooks.append(mod.register_state_dict_post_hook(functools.partial(self._dense_entry, i)))
            self.hooks.append(mod.register_load_state_dict_pre_hook(functools.partial(self._load_entry, i)))

    def release(self) -> None:
        super().release()
        self.shadows = None

    def dense_weight(self, i: int) -> torch.Tensor:
        if self.swapped:
            return self.shadows[1][i]
        return self.modules[i]._parameters["weight"]

    def dense_weights(self) -> list[torch.Tensor]:
        return list(self.shadows[1]) if self.swapped else self._weights()

    def _weights(self) -> list[torch.Tensor]:
        return [mod._parameters["weight"] for mod in self.modules]

    def before_optimizer_step(self) -> None:
        if not self.armed and self.owner.schedule.pattern is not None:
            raise RuntimeError("the N:M sparsifier was attached with verify_now=False and the weights were never "
                               "masked: call refresh() after wrapping the model (DDP) and before training")
        self.unmask(decay=True)

    def check_step(self) -> None:
        if self.swapped:
            raise RuntimeError("step() found the weights still masked: with `inplace`, call before_optimizer_step() "
                               "before every optimizer step (or pass optimizer= when attaching), or the optimizer "
                               "updates the masked weights")

    @torch.no_grad()
    def mask(self) -> None:
        """Keep the dense weights aside and mask the weights (no-op when already masked or in a
        dense SDGF stage)."""
        owner = self.owner
        self.armed = True
        if self.swapped or owner.schedule.pattern is None or any(p.pruned is None for p in owner.params.values()):
            return
        ws = self._weights()
        # New shadows only when the weights moved (model.to(), a load with assign=True): comparing
        # addresses is cheaper than comparing shapes, dtypes and devices, at every step.
        where = tuple(map(torch.Tensor.data_ptr, ws))
        if self.shadows is None or self.shadows[0] != where:
            self.shadows = (where, [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws])
        shadows = self.shadows[1]
        prs = self._pruned_on(ws)
        factor = owner.schedule.beta - 1.0
        flat = self._flat_pruned(prs) if ws[0].is_cuda else None
        if flat is None or not grouped.swap(ws, shadows, flat, factor):
            for w, sh, pr in zip(ws, shadows, prs):
                sh.copy_(w)
                w.addcmul_(sh, pr, value=factor)
        self.swapped = True

    @torch.no_grad()
    def unmask(self, decay: bool) -> None:
        """Put the dense weights back; with ``decay``, add SR-STE's ``lambda_w * (1 - mask) * W`` to
        their gradients (once, to the summed gradient of all micro-batches)."""
        if not self.swapped:
            return
        ws = self._weights()
        prs = self._pruned_on(ws)
        shadows = self.shadows[1]
        lam = self.owner.config.lambda_w if decay else 0.0
        grads = [w.grad for w in ws] if lam else None
        if grads is not None and all(g is None for g in grads):
            grads = None
        flat = self._flat_pruned(prs) if ws[0].is_cuda else None
        # swap() declines a list with some gradients missing: the per-layer ops take it then.
        if flat is None or not grouped.swap(ws, shadows, flat, lam, restore=True, grads=grads):
            for i, (w, sh, pr) in enumerate(zip(ws, shadows, prs)):
                w.copy_(sh)
                if grads is not None and grads[i] is not None:
                    grads[i].addcmul_(sh, pr, value=lam)
        self.swapped = False

    def resume(self) -> None:
        if self.armed:  # masking was on (attached with verify_now, or refreshed): on again, new masks
            self.mask()

    def _flat_pruned(self, prs: list[torch.Tensor]) -> torch.Tensor | None:
        """:func:`_flat_pruned`, kept while the masks are the same tensors (masking and restoring
        both need it)."""
        c = self.flat
        if c is not None and c[0] is prs[0] and c[1] is prs[-1]:
            return c[2]
        params = self.owner.params
        flat = _flat_pruned(params, prs)
        prs = [p.pruned for p in params.values()]  # re-seated when a new buffer was built
        self.flat = (prs[0], prs[-1], flat)
        return flat

    def _pruned_on(self, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's pruned mask, moved to its weight's device when the model was moved."""
        out = []
        for w, p in zip(ws, self.owner.params.values()):
            if p.pruned.get_device() != w.get_device():
                p.set_mask(p.mask.to(w.device))
            out.append(p.pruned)
        return out

    def _dense_entry(self, i: int, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        """State-dict hook: the dense weight, not the masked one."""
        if self.swapped and prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = self.shadows[1][i]

    @torch.no_grad()
    def _load_entry(self, i: int, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        """Load pre-hook: a loaded weight is dense; while masked, it goes to the dense copy and the
        layer receives its masked version. Checkpoints saved with the parametrization
        (``parametrizations.weight.original``) load too."""
        key, orig = prefix + "weight", prefix + "parametrizations.weight.original"
        if orig in state_dict and key not in state_dict:  # saved with the parametrization
            state_dict[key] = state_dict.pop(orig)
        if not self.swapped or key not in state_dict:
            return
        sh, incoming = self.shadows[1][i], state_dict[key]
        if not isinstance(incoming, torch.Tensor) or incoming.shape != sh.shape:
            return  # load_state_dict reports the mismatch
        sh.copy_(incoming)
        pr = self._pruned_on(self._weights())[i]
        state_dict[key] = torch.addcmul(sh, sh, pr, value=self.owner.schedule.beta - 1.0)


def strategy_for(config: NMConfig) -> type[MaskingStrategy]:
    """The strategy class a config chooses (``inplace``, ``masks_in_forward``, else the default)."""
    if config.inplace:
        return InPlace
    if config.masks_in_forward:
        return ForwardMasks
    return Parametrized


def _flat_pruned(params: dict[str, NMMask], prs: list[torch.Tensor]) -> torch.Tensor | None:
    """All layers' pruned masks as one flat bool tensor, in layer order, for the one-launch in-place
    masking: the buffer they are views of (``nm_masks`` writes them so), or else a new one, which
    the layers' masks are then re-seated into (so the next call finds it). None for no masks."""
    if not prs or any(pr is None for pr in prs):
        return None
    base = prs[0]._base
    # Views of one buffer, in order, are what nm_masks and this function write.
    if base is not None and base.dim() == 1 and prs[0].data_ptr() == base.data_ptr() and all(
            pr._base is base for pr in prs) and sum(pr.numel() for pr in prs) == base.numel():
        return base
    flat = torch.cat([pr.reshape(-1) for pr in prs])
    keep = ~flat
    start = 0
    for p, pr in zip(params.values(), prs):
        k = pr.numel()
        p.set_mask(keep[start:start + k].view(pr.shape), flat[start:start + k].view(pr.shape))
        start += k
    return flat


def _accept_plain_weight(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load a plain ``weight`` (a dense or finalized checkpoint) into a parametrized layer's dense weight."""
    plain, orig = prefix + "weight", prefix + "parametrizations.weight.original"
    if plain in state_dict and orig not in state_dict:
        state_dict[orig] = state_dict.pop(plain)
