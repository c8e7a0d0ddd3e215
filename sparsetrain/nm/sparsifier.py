"""The stateful N:M sparsifier: attaches masks to a model, steps the schedule, checkpoints, finalizes.

Plain-loop use::

    sparsifier = NMSparsifier(model, NMConfig(n=2, m=4, method="srste"))
    # with DDP: attach first (verify_now=False), then model = DDP(model); sparsifier.refresh()
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()            # once per optimizer step: schedule, masks, statistics
    sparsifier.finalize()            # weights exactly N:M, plain ``weight`` parameters again

The Lightning callback :class:`sparsetrain.callbacks.NMSparsity` drives the same object.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .. import contract
from . import grouped
from .export import nm_export_state_dict
from .masks import _nm_masks, check_nm, nm_mask, pack_mask, select_nm_layers, unpack_mask
from .methods import METHODS, NMMask, mdgf_beta, sdgf_ladder, sdgf_pattern

__all__ = ["NMConfig", "NMSparsifier"]

_STATE_VERSION = 2
#: The config fields that change what is computed: a state saved with other values is refused.
_MATH_FIELDS = ("n", "m", "method", "lambda_w", "update_every", "decay", "decay_steps", "stages", "include",
                "exclude")


@dataclass(kw_only=True)
class NMConfig:
    """How to train with N:M sparsity.

    Args:
        n: weights kept per group, ``1 <= n < m``.
        m: group size along the reduction dim.
        method: ``"ste"``, ``"srste"``, ``"mdgf"`` or ``"sdgf"`` (see :mod:`sparsetrain.nm.methods`).
        lambda_w: SR-STE's decay on pruned weights (Zhou et al. 2021); None means 2e-4 for
            ``srste``, ``mdgf`` and ``sdgf`` and 0 for ``ste``. MDGF and SDGF beat SR-STE at 1:8
            on the demo LM with it and lose without it (``benchmarks/results/nm.md``); 0 gives
            their authors' plain straight-through gradient.
        update_every: recompute the masks every this many optimizer steps (1 = every step, as in
            SR-STE); 0 keeps the masks fixed after attaching (fine-tuning a pruned model).
        decay: MDGF's beta schedule, ``"linear"`` or ``"exp"``.
        decay_steps: optimizer steps over which MDGF's beta decays to 0 / SDGF walks its ladder;
            required for ``mdgf`` and ``sdgf``.
        stages: SDGF's intermediate patterns ``[(n, m), ...]`` from dense towards the target;
            None uses :func:`~sparsetrain.nm.methods.sdgf_ladder` (e.g. 7:8, 4:8, 2:8 for 1:8).
        include: fnmatch patterns of layer names to sparsify (all Linear/Conv layers when None).
        exclude: fnmatch patterns of layer names to leave dense.
        grad_accumulation: micro-batches per optimizer step; SR-STE's term is added in every
            backward pass, so it is divided by this to be applied once per step.
        verify_every: check that the masks are identical on all ranks every this many mask
            updates (and when attaching and finalizing); 0 checks only then.
        compile_masks: compute all masks in one fused pass (:func:`~sparsetrain.nm.nm_masks`: one
            grouped Triton launch on CUDA where Triton is installed, else a ``torch.compile`` graph;
            no per-layer dispatch or host sync). None (default): on CUDA weights, eager elsewhere.
            See ``benchmarks/gpu_nm_overhead.py``.
        masks_in_forward: compute each layer's mask from its weight inside the forward pass
            (requires ``update_every=1``) instead of in a separate pass after every optimizer
            step. Meant for a ``torch.compile``'d model: the mask computation then fuses into the
            kernel that reads the weight and costs almost nothing. Eager models get the same
            masks and results, but pay the mask computation in every forward pass (also with
            gradient accumulation). The stored masks (statistics, rank checks, checkpoints,
            export) are then refreshed on demand and every ``verify_every`` steps, and the mask
            flip fraction is measured at those steps only (against the step before).
        inplace: mask the layers' own ``weight`` parameters in place instead of registering a
            parametrization: after each optimizer step the dense weights are copied aside and the
            weights masked (one Triton launch for all layers on CUDA), and before the next
            optimizer step they are put back, with SR-STE's term added to the gradients in the
            same launch. The forward and backward passes then run exactly as a dense model's (no
            per-layer op, autograd node or hook), at the price of one dense copy of the sparse
            weights in memory. It needs :meth:`NMSparsifier.before_optimizer_step` before every
            optimizer step (``optimizer=`` registers it; the Lightning callback calls it). Between
            the forward pass and the optimizer step, ``layer.weight`` holds the masked weight;
            ``state_dict()`` and ``load_state_dict()`` of the model see the dense weights. Not
            with ``masks_in_forward``, shared (tied) weights, or sharded optimizers that keep their
            own master weights (DeepSpeed, FSDP).
    """

    n: int = 2
    m: int = 4
    method: Literal["ste", "srste", "mdgf", "sdgf"] = "srste"
    lambda_w: float | None = None
    update_every: int = 1
    decay: Literal["linear", "exp"] = "linear"
    decay_steps: int | None = None
    stages: Sequence[tuple[int, int]] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    grad_accumulation: int = 1
    verify_every: int = 100
    compile_masks: bool | None = None
    masks_in_forward: bool = False
    inplace: bool = False
    _ladder: list[tuple[int, int]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        check_nm(self.n, self.m)
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        if self.lambda_w is None:
            self.lambda_w = 0.0 if self.method == "ste" else 2e-4
        if not (isinstance(self.lambda_w, (int, float)) and math.isfinite(self.lambda_w) and self.lambda_w >= 0):
            raise ValueError(f"`lambda_w` must be a finite number >= 0, got {self.lambda_w!r}")
        for name in ("update_every", "verify_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"`{name}` must be an integer >= 0, got {v!r}")
        if isinstance(self.grad_accumulation, bool) or not isinstance(self.grad_accumulation, int) \
                or self.grad_accumulation < 1:
            raise ValueError(f"`grad_accumulation` must be an integer >= 1, got {self.grad_accumulation!r}")
        if self.compile_masks is not None and not isinstance(self.compile_masks, bool):
            raise ValueError(f"`compile_masks` must be True, False or None (on CUDA only), got {self.compile_masks!r}")
        if not isinstance(self.masks_in_forward, bool):
            raise ValueError(f"`masks_in_forward` must be True or False, got {self.masks_in_forward!r}")
        if not isinstance(self.inplace, bool):
            raise ValueError(f"`inplace` must be True or False, got {self.inplace!r}")
        if self.inplace and self.masks_in_forward:
            raise ValueError("`inplace` and `masks_in_forward` exclude each other: in-place masks are computed "
                             "after the optimizer step, not in the forward pass")
        if self.masks_in_forward and self.update_every != 1:
            raise ValueError(f"`masks_in_forward` recomputes the masks in every forward pass, so it needs "
                             f"`update_every`=1, got {self.update_every}")
        if self.decay not in ("linear", "exp"):
            raise ValueError(f"`decay` must be 'linear' or 'exp', got {self.decay!r}")
        if self.method in ("mdgf", "sdgf"):
            if self.decay_steps is None or isinstance(self.decay_steps, bool) \
                    or not isinstance(self.decay_steps, int) or self.decay_steps < 1:
                raise ValueError(f"`decay_steps` must be an integer >= 1 for method {self.method!r}, "
                                 f"got {self.decay_steps!r}")
        elif self.decay_steps is not None:
            raise ValueError(f"`decay_steps` applies to 'mdgf' and 'sdgf' only, got {self.decay_steps!r} "
                             f"with method {self.method!r}")
        self.include = contract.check_patterns(self.include, "include")
        self.exclude = contract.check_patterns(self.exclude, "exclude")
        if self.stages is not None:
            if isinstance(self.stages, str) or not isinstance(self.stages, Sequence):
                raise ValueError(f"`stages` must be a list of (n, m) pairs, got {self.stages!r}")
            if self.method != "sdgf":
                raise ValueError(f"`stages` applies to 'sdgf' only, got method {self.method!r}")
            ladder = []
            for st in self.stages:
                if not (isinstance(st, (tuple, list)) and len(st) == 2):
                    raise ValueError(f"`stages` must be (n, m) pairs, got {st!r}")
                check_nm(int(st[0]), int(st[1]))
                if st[0] / st[1] <= self.n / self.m:
                    raise ValueError(f"`stages` must be denser than the target {self.n}:{self.m}, got "
                                     f"{st[0]}:{st[1]}")
                ladder.append((int(st[0]), int(st[1])))
            self.stages = tuple(ladder)
            self._ladder = ladder
        elif self.method == "sdgf":
            self._ladder = sdgf_ladder(self.n, self.m)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain Python values (what a sparsifier's state saves)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in ("include", "exclude"):
            out[name] = None if out[name] is None else list(out[name])
        out["stages"] = None if self.stages is None else [list(st) for st in self.stages]
        return out

    @property
    def ms(self) -> list[int]:
        """Every group size the layers must accept (the target's and the SDGF stages')."""
        return sorted({self.m, *(mm for _, mm in self._ladder)})

    def pattern(self, step: int) -> tuple[int, int] | None:
        """The N:M pattern in force at optimizer step ``step`` (None: dense)."""
        if self.method != "sdgf":
            return (self.n, self.m)
        return sdgf_pattern(step, (self.n, self.m), self._ladder, self.decay_steps)

    def beta(self, step: int) -> float:
        """The weight on pruned entries in the forward pass at ``step`` (MDGF; 0 otherwise)."""
        if self.method != "mdgf":
            return 0.0
        return mdgf_beta(step, self.decay_steps, self.decay)


class NMSparsifier:
    """Trains a model's Linear/Conv layers in an N:M pattern with dense weights underneath.

    Attaching registers an :class:`~sparsetrain.nm.methods.NMMask` parametrization on each
    selected layer's ``weight`` (the dense parameter object is kept, so an optimizer built
    before or after keeps working) and computes the masks from the current weights. Each
    :meth:`step` (call it once per optimizer step) advances the schedule, recomputes the masks
    when due (every ``update_every`` steps, and whenever the SDGF pattern changes) and records the
    fraction of mask entries that flipped. Masks are a deterministic function of the weights;
    under ``torch.distributed`` they are checked to be identical on every rank.

    Under DDP, attach to the plain module BEFORE wrapping it (DDP's gradient hooks must be
    registered on the parametrized weights; the parametrization re-seats the parameter), with
    ``verify_now=False`` if the ranks' initial weights may differ, and call :meth:`refresh` after
    wrapping: DDP broadcasts rank 0's weights when it wraps, and the masks must be recomputed
    from those.

    With ``NMConfig(inplace=True)`` no parametrization is registered: the layers' weights are
    masked in place after attaching (or at :meth:`refresh`, with ``verify_now=False``) and after
    every :meth:`step`, and :meth:`before_optimizer_step` puts the dense weights back before each
    optimizer step (see :class:`NMConfig`).

    It follows the component contract of ``docs/architecture.md``: it claims the selected layers'
    weights on the model (:func:`sparsetrain.contract.attach`; a layer claimed by another component
    is refused), :meth:`masks` gives the forward masks by parameter name, :meth:`statistics` the
    ``nm/...`` figures, :meth:`state_dict` is versioned and carries the config, :meth:`check_ranks`
    raises :class:`~sparsetrain.contract.RankDivergenceError`, and :meth:`remove` leaves a plain
    model. N:M keeps dense gradients by design (the straight-through estimator): its masks
    constrain the forward weight only (``masks_gradients = False``).

    Args:
        model: the model (not yet wrapped in DDP).
        config: an :class:`NMConfig`; keyword arguments build one when omitted (not both).
        optimizer: when given, :meth:`step` runs after each ``optimizer.step()`` through
            ``optimizer.register_step_post_hook`` (a step skipped by a GradScaler is not counted),
            and with ``inplace`` :meth:`before_optimizer_step` before it (a step pre-hook);
            otherwise call them yourself around each optimizer step.
        grad_scaler: a ``torch.amp.GradScaler`` when training in fp16 with loss scaling: the
            SR-STE term is then multiplied by the current scale so it survives unscaling.
        process_group: group for the rank-equality check (default group when None).
        verify_now: check rank equality of the masks right away; pass False when the weights are
            not synchronised yet (e.g. before DDP wraps the model) and call :meth:`refresh` later.
        **kwargs: :class:`NMConfig` fields, when ``config`` is omitted.

    Raises:
        ValueError: bad config, no layer can take the pattern, a layer already has a
            parametrized ``weight`` or is claimed by another component, ``model`` is already
            wrapped in DDP, or (``inplace``) a sparse weight is shared with another module.
    """

    #: N:M masks the forward weight only; gradients stay dense (straight-through estimator).
    masks_gradients = False

    __slots__ = (
        # hyperparameters
        "config", "model", "grad_scaler", "process_group",
        # internal state
        "layers", "_params", "_hooks", "step_count", "_pattern", "_updates", "_finalized", "_stale",
        "_shadows", "_swapped", "_armed", "_flat", "mask_version", "__weakref__",
        # statistics
        "last_flip_fraction", "_flip_count", "_flip_total",
    )

    def __init__(self, model: nn.Module, config: NMConfig | None = None, *, optimizer: Any = None,
                 process_group: Any = None, grad_scaler: Any = None, verify_now: bool = True,
                 **kwargs: Any) -> None:
        if config is None:
            config = NMConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either `config` or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(config, NMConfig):
            raise ValueError(f"`config` must be an NMConfig, got {type(config).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("`model` is already wrapped in DistributedDataParallel: attach the sparsifier to the "
                             "plain module before wrapping (DDP's gradient hooks must see the parametrized "
                             "weights), then call refresh() after wrapping")
        self.config = config
        self.model = model
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        if not isinstance(verify_now, bool):
            raise ValueError(f"`verify_now` must be True or False, got {verify_now!r}")
        if optimizer is not None and not hasattr(optimizer, "register_step_post_hook"):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.layers = select_nm_layers(model, config.ms, config.include, config.exclude)
        # Claimed before the model is touched: a layer another component masks is refused as it is.
        contract.attach(model, self, claimed=[f"{name}.weight" for name in self.layers])
        try:
            for name, mod in self.layers.items():
                if parametrize.is_parametrized(mod, "weight"):
                    raise ValueError(f"layer {name!r} already has a parametrized `weight` (is N:M "
                                     f"sparsity attached twice?); N:M needs the plain weight")
            if config.inplace:
                _check_unshared(model, self.layers)
        except ValueError:
            contract.detach(model, self)
            raise
        self.mask_version = 0
        self.step_count = 0
        self._pattern = config.pattern(0)
        self._updates = 0
        self._finalized = False
        self.last_flip_fraction: torch.Tensor | None = None
        self._flip_count: torch.Tensor | None = None
        self._flip_total = 0
        self._params: dict[str, NMMask] = {}
        self._stale = False  # masks_in_forward: the stored masks lag the weights
        # inplace: (the weights' addresses, their dense values while masked)
        self._shadows: tuple[tuple[int, ...], list[torch.Tensor]] | None = None
        self._swapped = False  # inplace: the weights hold their masked values now
        self._armed = False  # inplace: masked at least once (attached with verify_now, or refresh())
        self._flat: tuple | None = None  # inplace on CUDA: (first, last pruned mask, their flat buffer)
        self._hooks = []
        lam = self._lambda()
        for i, (name, mod) in enumerate(self.layers.items()):
            p = NMMask(None, beta=config.beta(0), lambda_w=lam)
            self._params[name] = p
            if config.inplace:  # the NMMask only holds the masks
                self._hooks.append(mod.register_state_dict_post_hook(functools.partial(self._dense_entry, i)))
                self._hooks.append(mod.register_load_state_dict_pre_hook(functools.partial(self._load_entry, i)))
                continue
            parametrize.register_parametrization(mod, "weight", p, unsafe=True)
            _direct_weight_property(mod)
            self._hooks.append(mod.register_load_state_dict_pre_hook(_accept_plain_weight))
            if config.lambda_w:  # SR-STE's term (any method may set lambda_w)
                w = mod.parametrizations.weight.original
                self._hooks.append(w.register_hook(functools.partial(p.decay_gradient, w)))
        with torch.no_grad():
            self._recompute(count_flips=False)
        self._set_forward_pattern()
        if optimizer is not None:
            if config.inplace:
                self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        if verify_now:
            self.check_ranks()
            self._mask_in_place()

    # ------------------------------------------------------------------ weights and masks
    def dense_weight(self, name: str) -> torch.Tensor:
        """The live dense weight (the trained parameter) of layer ``name``."""
        if self.config.inplace:
            if self._swapped:
                return self._shadows[1][list(self.layers).index(name)]
            return self.layers[name]._parameters["weight"]
        return _original(self.layers[name])

    # ------------------------------------------------------------------ inplace: masking the weights themselves
    def _plain_weights(self) -> list[torch.Tensor]:
        return [mod._parameters["weight"] for mod in self.layers.values()]

    @torch.no_grad()
    def _mask_in_place(self) -> None:
        """``inplace``: keep the dense weights aside and mask the weights (no-op when already masked,
        in a dense SDGF stage, or without ``inplace``)."""
        if not self.config.inplace:
            return
        self._armed = True
        if self._swapped or self._pattern is None or any(p.pruned is None for p in self._params.values()):
            return
        ws = self._plain_weights()
        # New shadows only when the weights moved (model.to(), a load with assign=True): comparing
        # addresses is cheaper than comparing shapes, dtypes and devices, at every step.
        where = tuple(map(torch.Tensor.data_ptr, ws))
        if self._shadows is None or self._shadows[0] != where:
            self._shadows = (where, [torch.empty_like(w, memory_format=torch.contiguous_format) for w in ws])
        shadows = self._shadows[1]
        prs = self._pruned_on(ws)
        factor = self.config.beta(self.step_count) - 1.0
        flat = self._flat_pruned(prs) if ws[0].is_cuda else None
        if flat is None or not grouped.swap(ws, shadows, flat, factor):
            for w, sh, pr in zip(ws, shadows, prs):
                sh.copy_(w)
                w.addcmul_(sh, pr, value=factor)
        self._swapped = True

    @torch.no_grad()
    def _restore(self, decay: bool) -> None:
        """``inplace``: put the dense weights back; with ``decay``, add SR-STE's
        ``lambda_w * (1 - mask) * W`` to their gradients."""
        if not self._swapped:
            return
        ws = self._plain_weights()
        prs = self._pruned_on(ws)
        shadows = self._shadows[1]
        lam = self.config.lambda_w if decay else 0.0
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
        self._swapped = False

    def _flat_pruned(self, prs: list[torch.Tensor]) -> torch.Tensor | None:
        """:func:`_flat_pruned`, kept while the masks are the same tensors (masking and restoring
        both need it)."""
        c = self._flat
        if c is not None and c[0] is prs[0] and c[1] is prs[-1]:
            return c[2]
        flat = _flat_pruned(self._params, prs)
        prs = [p.pruned for p in self._params.values()]  # re-seated when a new buffer was built
        self._flat = (prs[0], prs[-1], flat)
        return flat

    def _pruned_on(self, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's pruned mask, moved to its weight's device when the model was moved."""
        out = []
        for w, p in zip(ws, self._params.values()):
            if p.pruned.get_device() != w.get_device():
                p.set_mask(p.mask.to(w.device))
            out.append(p.pruned)
        return out

    def before_optimizer_step(self) -> None:
        """``inplace``: put the dense weights back and add SR-STE's term to their gradients; call it
        after the backward pass(es) and before every ``optimizer.step()`` (``optimizer=`` does).
        A no-op without ``inplace``.

        Raises:
            RuntimeError: the weights were never masked (attached with ``verify_now=False`` and
                :meth:`refresh` not called).
        """
        self._check_live()
        if not self.config.inplace:
            return
        if not self._armed and self._pattern is not None:
            raise RuntimeError("the N:M sparsifier was attached with verify_now=False and the weights were never "
                               "masked: call refresh() after wrapping the model (DDP) and before training")
        self._restore(decay=True)

    def _dense_entry(self, i: int, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        """State-dict hook (``inplace``): the dense weight, not the masked one."""
        if self._swapped and prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = self._shadows[1][i]

    @torch.no_grad()
    def _load_entry(self, i: int, module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        """Load pre-hook (``inplace``): a loaded weight is dense; while masked, it goes to the dense
        copy and the layer receives its masked version. Checkpoints saved with the parametrization
        (``parametrizations.weight.original``) load too."""
        key, orig = prefix + "weight", prefix + "parametrizations.weight.original"
        if orig in state_dict and key not in state_dict:  # saved with the parametrization
            state_dict[key] = state_dict.pop(orig)
        if not self._swapped or key not in state_dict:
            return
        sh, incoming = self._shadows[1][i], state_dict[key]
        if not isinstance(incoming, torch.Tensor) or incoming.shape != sh.shape:
            return  # load_state_dict reports the mismatch
        sh.copy_(incoming)
        pr = self._pruned_on(self._plain_weights())[i]
        state_dict[key] = torch.addcmul(sh, sh, pr, value=self.config.beta(self.step_count) - 1.0)

    @property
    def masks(self) -> _Masks:
        """``masks()``: parameter name (``"<layer>.weight"``, the weight's name in the plain model) ->
        the bool mask the forward pass uses (``True`` = kept).

        A layer without a current pattern (during SDGF's first, dense stage) is left out, so the
        dict may be ``{}``; after :meth:`finalize` it is ``{}``.
        With ``masks_in_forward`` the stored masks are brought up to date first.

        Reading ``masks`` as a mapping (``sp.masks[layer]``, keyed by module name, None in a dense
        stage) is the previous API: it still works and warns.
        """
        return _Masks(self)

    def _param_masks(self) -> dict[str, torch.Tensor]:
        self._refresh_stored()
        return {f"{name}.weight": p.mask for name, p in self._params.items() if p.mask is not None}

    def _layer_masks(self) -> dict[str, torch.Tensor | None]:
        self._refresh_stored()
        return {name: p.mask for name, p in self._params.items()}

    def _set_forward_pattern(self) -> None:
        if self.config.masks_in_forward:
            for p in self._params.values():
                if p.nm != self._pattern:
                    p.nm = self._pattern

    @torch.no_grad()
    def _refresh_stored(self) -> None:
        """With ``masks_in_forward``: bring the stored masks up to date with the weights."""
        if self._stale and not self._finalized:
            self._recompute(count_flips=False)

    @property
    def pattern(self) -> tuple[int, int] | None:
        """The N:M pattern in force now (None: dense stage)."""
        return self._pattern

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` ran (weights exactly N:M, parametrizations removed)."""
        return self._finalized

    def _lambda(self) -> float:
        lam = self.config.lambda_w / self.config.grad_accumulation
        if lam and self.grad_scaler is not None and self.grad_scaler.is_enabled():
            lam *= float(self.grad_scaler.get_scale())
        return lam

    @torch.no_grad()
    def refresh(self, recompute: bool = True) -> None:
        """Recompute every mask from the current weights and check they are equal on all ranks;
        with ``inplace``, then mask the weights in place.

        Args:
            recompute: False keeps the current masks (e.g. just restored from a checkpoint) and
                only checks them and, with ``inplace``, masks the weights.

        Raises:
            ValueError: ``recompute`` is not a bool.
        """
        if not isinstance(recompute, bool):
            raise ValueError(f"`recompute` must be True or False, got {recompute!r}")
        self._check_live()
        self._restore(decay=False)
        if recompute:
            self._recompute(count_flips=False)
        self.check_ranks()
        self._mask_in_place()

    def _recompute(self, count_flips: bool) -> None:
        self._stale = False
        self.mask_version += 1
        pat = self._pattern
        if pat is None:
            for p in self._params.values():
                p.set_mask(None)
            return
        weights = [self.dense_weight(name) for name in self._params]
        olds = []
        for w, p in zip(weights, self._params.values()):
            old = p.mask if count_flips and p.mask is not None and p.mask.shape == w.shape else None
            if old is not None and old.get_device() != w.get_device():
                old = old.to(w.device)
            olds.append(old)
        compiled = self._compiled(weights)
        if pat[1] <= 16:  # the layers' shapes were checked when attaching
            news, comps, flips = _nm_masks(weights, *pat, olds, compiled, complements=True, check=False)
        else:
            news = [nm_mask(w, *pat) for w in weights]
            comps = [~new for new in news]
            flips = sum((new != old).sum() for new, old in zip(news, olds) if old is not None) \
                if any(o is not None for o in olds) else None
        for p, new, comp in zip(self._params.values(), news, comps):
            p.set_mask(new, comp)
        if flips is not None:
            total = sum(old.numel() for old in olds if old is not None)
            self.last_flip_fraction = flips.double() / total
            self._flip_count = flips if self._flip_count is None else self._flip_count + flips.to(
                self._flip_count.device)
            self._flip_total += total

    def _compiled(self, weights: list[torch.Tensor]) -> bool:
        """Whether to compute masks under torch.compile: as configured, or (None) on CUDA weights."""
        if self.config.compile_masks is None:
            return bool(weights) and weights[0].is_cuda
        return self.config.compile_masks

    # ------------------------------------------------------------------ the schedule
    @torch.no_grad()
    def step(self) -> None:
        """Advance one optimizer step: schedule (beta, SDGF pattern), masks when due, statistics."""
        self._check_live()
        if self._swapped:
            raise RuntimeError("step() found the weights still masked: with `inplace`, call before_optimizer_step() "
                               "before every optimizer step (or pass optimizer= when attaching), or the optimizer "
                               "updates the masked weights")
        cfg = self.config
        self.step_count += 1
        t = self.step_count
        new_pattern = cfg.pattern(t)
        changed = new_pattern != self._pattern
        self._pattern = new_pattern
        beta, lam = cfg.beta(t), self._lambda()
        for p in self._params.values():
            # Only on a change (MDGF's decay, a new loss scale): a module's __setattr__ is not free,
            # and this runs for every layer at every step.
            if p.beta != beta or p.lambda_w != lam:
                p.beta, p.lambda_w = beta, lam
        if cfg.masks_in_forward:
            self._step_forward_masks(t, changed)
            return
        due = cfg.update_every > 0 and t % cfg.update_every == 0
        if changed or due:
            self._recompute(count_flips=not changed)
            self._updates += 1
            if cfg.verify_every and self._updates % cfg.verify_every == 0:
                self.check_ranks()
        self._mask_in_place()

    def _step_forward_masks(self, t: int, changed: bool) -> None:
        """``step()`` with ``masks_in_forward``: the forward pass computes the masks; the stored ones
        are refreshed at the step before every ``verify_every``-th (without counting flips) and at
        it (counting the flips of that one step, then checking ranks)."""
        self._set_forward_pattern()
        self._updates += 1
        self._stale = True
        self.mask_version += 1  # the forward pass computes new masks from the new weights
        k = self.config.verify_every
        if changed:
            self._recompute(count_flips=False)
        elif k and t % k == 0:
            self._recompute(count_flips=True)
            self.check_ranks()
        elif k and (t + 1) % k == 0:
            self._recompute(count_flips=False)

    def statistics(self) -> dict[str, float]:
        """Flat statistics, plain floats (one host copy of the device counters):

        - ``nm/step``: optimizer steps taken; ``nm/n``, ``nm/m``: the target pattern;
        - ``nm/density``: the fraction of each sparse weight the forward pass keeps under the pattern
          in force (``n/m``; 1.0 in SDGF's dense stage);
        - ``nm/beta`` (``mdgf`` only): the weight on pruned entries in the forward pass;
        - ``nm/mask_flip_fraction``: the fraction of mask entries that flipped at the last measured
          update, and ``nm/mean_mask_flip_fraction`` on average since attaching (SR-STE's aim is to
          make it fall); both present once an update was measured.

        These are the keys the Lightning callback logs and its ``summary()`` writes.
        """
        pat, cfg = self._pattern, self.config
        out: dict[str, float] = {
            "nm/step": float(self.step_count),
            "nm/n": float(cfg.n),
            "nm/m": float(cfg.m),
            "nm/density": pat[0] / pat[1] if pat else 1.0,
        }
        if cfg.method == "mdgf":
            out["nm/beta"] = float(cfg.beta(self.step_count))
        if self.last_flip_fraction is not None:
            last, count = torch.stack([self.last_flip_fraction.double(),
                                       self._flip_count.to(self.last_flip_fraction.device).double()]).tolist()
            out["nm/mask_flip_fraction"] = last
            out["nm/mean_mask_flip_fraction"] = count / self._flip_total
        return out

    def stats(self) -> dict[str, Any]:
        """Deprecated: use :meth:`statistics` (flat ``nm/...`` keys, plain floats).

        Statistics: step, the pattern in force (``"2:4"``, ``"dense"``), beta, density of the
        forward weights, and the fraction of mask entries that flipped at the last update and on
        average since attaching.
        """
        warnings.warn("NMSparsifier.stats() is deprecated; use statistics() (keys 'nm/step', 'nm/density', "
                      "'nm/mask_flip_fraction', ...)", FutureWarning, stacklevel=2)
        pat = self._pattern
        out: dict[str, Any] = {
            "step": self.step_count,
            "pattern": f"{pat[0]}:{pat[1]}" if pat else "dense",
            "beta": self.config.beta(self.step_count),
            "density": pat[0] / pat[1] if pat else 1.0,
        }
        if self.last_flip_fraction is not None:
            out["mask_flip_fraction"] = float(self.last_flip_fraction)
            out["mean_mask_flip_fraction"] = float(self._flip_count) / self._flip_total
        return out

    # ------------------------------------------------------------------ distributed
    @torch.no_grad()
    def check_ranks(self) -> None:
        """Raise unless every rank holds identical masks and schedule (no-op outside ``torch.distributed``).

        Compares a per-layer fingerprint of the masks (:func:`sparsetrain.contract.fingerprint`) and
        the schedule's step and pattern with :func:`sparsetrain.contract.check_in_sync`.

        Raises:
            RankDivergenceError: on every rank, naming the layers whose masks differ.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.process_group) < 2:
            return
        self._refresh_stored()
        pat = self._pattern or (0, 0)
        fps = {"nm/schedule": torch.tensor([self.step_count, pat[0], pat[1]], dtype=torch.int64)}
        for name, p in self._params.items():  # every layer, in order: the same rows on every rank
            fps[f"{name}.weight"] = (contract.fingerprint(p.mask) if p.mask is not None
                                     else torch.tensor([-1, -1], dtype=torch.int64))
        device = next((f.device for f in fps.values() if f.device.type != "cpu"), None)
        if device is not None:
            fps = {k: v.to(device) for k, v in fps.items()}
        try:
            contract.check_in_sync(fps, self.process_group, what=f"N:M masks at step {self.step_count}")
        except contract.RankDivergenceError as err:
            raise contract.RankDivergenceError(
                f"{err}: the weights are not identical on every rank (was the sparsifier attached before DDP "
                f"broadcast the weights? call refresh() after wrapping)") from None

    # ------------------------------------------------------------------ export / finalize
    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every sparse layer's weight exactly N:M (plain keys, copies).

        Uses the current masks when they are at the target pattern; otherwise (an SDGF stage
        before the target) the target mask of the current dense weights.
        """
        self._check_live()
        return nm_export_state_dict(self.model.state_dict(), self.config.n, self.config.m,
                                    masks=self._target_masks(), layers=list(self.layers))

    def _target_masks(self) -> dict[str, torch.Tensor]:
        if self._pattern != (self.config.n, self.config.m):
            return {}
        self._refresh_stored()
        return {name: p.mask for name, p in self._params.items() if p.mask is not None}

    @torch.no_grad()
    def finalize(self) -> dict[str, nn.Module]:
        """End training: make each sparse weight exactly N:M in place and remove the parametrizations.

        The layers get their plain ``weight`` parameter back (the same object the optimizer holds)
        holding ``where(mask, W, 0)`` at the target pattern. Idempotent.

        Returns:
            The finalized layers by name.
        """
        if self._finalized:
            return dict(self.layers)
        self.check_ranks()
        self._restore(decay=False)
        target = self._target_masks()
        n, m = self.config.n, self.config.m
        for name, mod in self.layers.items():
            w = self.dense_weight(name)
            mask = target.get(name)
            mask = nm_mask(w, n, m) if mask is None else mask.to(w.device)
            if not self.config.inplace:
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.copy_(torch.where(mask, mod.weight, 0.0))
            self._params[name].set_mask(None)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._shadows = None
        self._finalized = True
        self.mask_version += 1
        contract.detach(self.model, self)
        return dict(self.layers)

    def remove(self) -> None:
        """Leave a plain model: what :meth:`finalize` does (each sparse weight exactly N:M in its plain
        ``weight`` parameter, no parametrization, no hook), and detach from the model. Idempotent."""
        self.finalize()

    def _check_live(self) -> None:
        if self._finalized:
            raise RuntimeError("this NMSparsifier was finalized; attach a new one to keep training sparse")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain-dict state (version 2): the config, schedule step, pattern, packed masks by layer,
        statistics; plain tensors and Python values (loads with ``weights_only=True``)."""
        cfg = self.config
        self._refresh_stored()
        masks = {}
        shapes = {}
        for name, p in self._params.items():
            if p.mask is not None:
                masks[name] = pack_mask(p.mask).cpu()
                shapes[name] = list(p.mask.shape)
        return {
            "version": _STATE_VERSION,
            "config": cfg.to_dict(),
            "n": cfg.n, "m": cfg.m, "method": cfg.method,
            "step": self.step_count,
            "updates": self._updates,
            "pattern": list(self._pattern) if self._pattern else None,
            "layers": list(self.layers),
            "masks": masks,
            "mask_shapes": shapes,
            "flip_count": int(self._flip_count) if self._flip_count is not None else None,
            "flip_total": self._flip_total,
            "last_flip_fraction": float(self.last_flip_fraction) if self.last_flip_fraction is not None else None,
            "finalized": self._finalized,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the model's own weights were restored).

        The state of a finalized sparsifier resumes too (training more steps after a finished
        run): the masks are then recomputed from the restored, already N:M, weights.

        Reads version 2 and the previous release's version 1 (which saved no config: only its
        pattern and method are checked).

        Raises:
            ValueError: an unknown version, a config that differs from this one in a field that
                changes the math (naming it: n, m, method, lambda_w, update_every, decay,
                decay_steps, stages, include, exclude), or another set of layers.
        """
        self._check_live()
        if not isinstance(state, Mapping):
            raise ValueError(f"`state` must be a dict from NMSparsifier.state_dict(), got {type(state).__name__}")
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"`state` has version {version!r}; this sparsetrain reads versions 1 and {_STATE_VERSION}")
        saved = dict(state["config"]) if version >= 2 else {k: state[k] for k in ("n", "m", "method")}
        if saved.get("stages") is not None:
            saved["stages"] = [tuple(st) for st in saved["stages"]]
        contract.check_config(saved, self.config, _MATH_FIELDS, "NMSparsifier")
        cfg = self.config
        if list(state["layers"]) != list(self.layers):
            missing = sorted(set(state["layers"]) ^ set(self.layers))
            raise ValueError(f"`state` covers other layers than this sparsifier (differing: {', '.join(missing)})")
        self._restore(decay=False)
        self.step_count = int(state["step"])
        self._updates = int(state["updates"])
        self._pattern = tuple(state["pattern"]) if state["pattern"] is not None else None
        beta, lam = cfg.beta(self.step_count), self._lambda()
        for name, p in self._params.items():
            p.beta, p.lambda_w = beta, lam
            if state.get("finalized"):
                # Training continues after a finished run: its weights are already exactly N:M.
                p.set_mask(nm_mask(self.dense_weight(name), *self._pattern) if self._pattern else None)
            elif name in state["masks"]:
                w = self.dense_weight(name)
                p.set_mask(unpack_mask(state["masks"][name].to(w.device), state["mask_shapes"][name]))
            else:
                p.set_mask(None)
        self._stale = False
        self._set_forward_pattern()
        fc = state.get("flip_count")
        self._flip_count = torch.tensor(fc) if fc is not None else None
        self._flip_total = int(state.get("flip_total") or 0)
        lf = state.get("last_flip_fraction")
        self.last_flip_fraction = torch.tensor(lf, dtype=torch.float64) if lf is not None else None
        self.mask_version += 1
        self.check_ranks()
        if self._armed:  # masking was on (attached with verify_now, or refreshed): on again, new masks
            self._mask_in_place()


def _direct_weight_property(mod: nn.Module) -> None:
    """Make ``mod.weight`` call the layer's :class:`NMMask` directly.

    ``register_parametrization`` gives ``mod`` a class of its own, whose ``weight`` property goes
    through ``ParametrizationList.__call__``, which probes for further parametrizations with
    ``hasattr`` (a raised and caught AttributeError) at every access: several times the cost of
    the masking itself, for every layer in every forward pass of an eager model. This replaces
    that property (on ``mod``'s own class only) by one that reads the dense weight and calls the
    single parametrization's ``forward``; inside ``parametrize.cached()`` it defers to the original
    property. ``remove_parametrizations`` removes it like the original.
    """
    cls = type(mod)
    original = cls.__dict__["weight"]

    def weight(self):
        if parametrize._cache_enabled:
            return original.fget(self)
        plist = self._modules["parametrizations"]._modules["weight"]
        return plist._modules["0"].forward(plist._parameters["original"])

    cls.weight = property(weight, original.fset)


def _original(mod: nn.Module) -> torch.Tensor:
    """The dense weight of a parametrized layer (``mod.parametrizations.weight.original``, read
    from the module dicts directly: this runs for every layer at every mask update)."""
    return mod._modules["parametrizations"]._modules["weight"]._parameters["original"]


def _check_unshared(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """``inplace`` masks the parameter itself: refuse a sparse weight that another module also uses."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, mod in layers.items():
        names = owners.get(id(mod.weight), [])
        if len(names) > 1:
            raise ValueError(f"`inplace` masks the weight parameter itself, but layer {name!r} shares it "
                             f"({', '.join(names)}); use inplace=False or exclude the layer")


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


class _Masks(Mapping):
    """What :attr:`NMSparsifier.masks` returns: call it for the contract's ``masks()`` (parameter
    name -> mask); read it as a mapping for the previous API (layer name -> mask or None), which
    warns."""

    __slots__ = ("_owner",)

    def __init__(self, owner: NMSparsifier) -> None:
        self._owner = owner

    def __call__(self) -> dict[str, torch.Tensor]:
        return self._owner._param_masks()

    def _legacy(self) -> dict[str, torch.Tensor | None]:
        warnings.warn("reading NMSparsifier.masks as a mapping by layer name is deprecated; call masks(), keyed "
                      "by parameter name ('<layer>.weight')", FutureWarning, stacklevel=3)
        return self._owner._layer_masks()

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self._legacy()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._legacy())

    def __len__(self) -> int:
        return len(self._owner._params)
