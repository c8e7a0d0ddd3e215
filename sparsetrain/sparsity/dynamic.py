"""Dynamic sparse training from a plain loop: the sparsifier that orchestrates it.

:class:`DynamicSparsifier` owns the stateful side (masks, hooks, counts, the schedule); its config,
:class:`~sparsetrain.sparsity.DynamicSparsityConfig`, is in :mod:`.config` (and importable from here
too); the algorithms are the pure functions of :mod:`.rigl`, :mod:`.set`, :mod:`.gmp` and :mod:`.density`;
the grouped mask update is :mod:`.update`, the rule that decides when the masks must be re-applied
is :mod:`.enforcement`, and the check that lets a gradient be masked in place is
:mod:`._sole_owner`. Usage::

    sparsifier = DynamicSparsifier(model, method="rigl", sparsity=0.9, total_steps=10_000, optimizer=optimizer)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()          # the sparsifier's step-post hook updates / enforces the masks
        optimizer.zero_grad()

How the invariants are kept (each is tested):

- Every sparsified module gets a persistent ``torch.bool`` buffer ``weight_mask`` beside its
  ``weight``; ``model.state_dict()`` carries it and ``model.load_state_dict()`` restores it
  (a load post-hook then re-masks the weights). The parameter keeps its name and shape, so
  checkpoints stay loadable by code that knows nothing of the masks.
- The stored weights are exactly zero outside the mask at every point the model can be run:
  after construction, after every optimizer step, after every mask update and after every
  ``load_state_dict``. So the forward always sees ``torch.where(mask, W, 0)``, at no cost to
  the forward itself (how, see the enforcement item below).
- A tensor hook on each sparsified weight turns its gradient into ``torch.where(mask, g, 0)``
  before it is accumulated (and before DDP reduces it), so gradient clipping and the optimizer
  see the gradient of the masked model. On steps whose update needs it (RigL), the same hook
  first adds the unmasked gradient -- the dense gradient of the masked forward -- to a side
  buffer, summing over gradient-accumulation micro-batches; it is all-reduced across ranks
  before the update. Masking is NaN-safe (a NaN or inf outside the mask becomes 0), never
  ``x * mask``: ``torch.where`` on accelerators; on CPU, where torch's bool-select kernel is not
  vectorised (about 10x slower than a multiply), the same result bit for bit from an AND of the
  float's bits with a cached integer mask of all-ones / all-zeros. The hook masks the gradient
  in place (no new tensor per layer and step) when nothing but the autograd engine refers to it,
  which is the usual case; a gradient shared with anything else (a user's hook that keeps it, an
  addition that hands it to two inputs, views of one storage) gets a masked copy instead
  (:mod:`._sole_owner`).
- On accelerators, a mask update selects the layers of one shape, dtype, device and active count
  together (a few tensor operations per group of layers instead of per layer: one ``topk`` for
  all the attention projections of a transformer, say); the masks are those of the per-layer
  functions, because selections are exact (:mod:`.masks`). On the CPU, where stacking the layers
  costs more than it saves, layers are updated one by one (:mod:`.update`).
- Weights and every optimizer state tensor of the weight's shape (SGD momentum, Adam
  ``exp_avg`` / ``exp_avg_sq``, ...) stay exactly zero outside the mask, so momentum and weight
  decay cannot revive pruned weights. A full enforcement pass zeroes them at attach, after every
  mask update and after every ``load_state_dict`` (model or optimizer). Between those points
  (``enforce_interval="auto"``, the default) no pass is needed when every attached optimizer is
  one of the torch optimizers listed in :data:`ZERO_PRESERVING_OPTIMIZERS`: their update is
  elementwise and maps (weight 0, states 0, gradient 0) to (weight 0, states 0) exactly, and the
  gradient hook above makes the gradient 0 outside the mask, so by induction over the steps the
  zeros stay zeros (the per-optimizer argument is in :mod:`.enforcement`; they
  are equal as values: a state may hold -0.0 where the pass would write +0.0). This assumes that
  between ``backward()`` and ``optimizer.step()`` the gradients are only scaled or clipped, and
  that nothing but the optimizer writes the weights; code that does more (adds gradient noise,
  re-initialises weights) calls :meth:`DynamicSparsifier.apply_masks` or sets
  ``enforce_interval=1``. With any other optimizer, with state maskers (DeepSpeed master
  weights), or when asked for (``enforce_interval=N``), the pass runs after every N-th optimizer
  step (1 in auto mode). Steps are counted by a
  ``register_step_post_hook`` hook or explicit :meth:`DynamicSparsifier.step` calls; mask
  updates happen at the same point, so gradient accumulation is respected.
- Under ``torch.distributed`` every rank takes the same decisions: growth by the all-reduced
  dense gradient, random choices from a generator seeded alike on every rank (its state is
  checkpointed), and after each update (and every ``verify_every`` steps) a fingerprint of all
  masks is compared across ranks; a mismatch raises :class:`MaskDivergenceError`. The masks are
  excluded from DDP's buffer broadcast (so a divergence cannot be papered over by rank 0's copy, and the masks do not
  travel every step). SET's growth scores for weights on an accelerator are drawn there, from a
  device generator reseeded from that CPU generator before each layer, so the checkpointed CPU
  state still determines them; they differ from the numbers a CPU run draws and, since CUDA's
  random numbers for large tensors depend on the launch grid (the GPU's multiprocessor count),
  may differ between GPU models: the ranks of one run need GPUs of one model (else the fingerprint
  check raises).
- Stacked MoE expert weights (``GroupedExperts.w1_EFD`` / ``w2_EDF`` / ``w3_EFD``, marked by
  :data:`.stacked.STACKED_ATTR`) are sparsified when ``include`` names them by parameter name
  (``"*.experts.w1_EFD"``). Each gets a persistent ``[E, ...]`` bool buffer ``<attr>_mask`` beside it
  (``w1_EFD_mask``) and is keyed by its parameter name in :meth:`DynamicSparsifier.masks`. Every
  expert slice is a layer of its own for the densities (ERK with E not a fan dimension), the
  per-slice active counts (checked on load) and the RigL / SET / GMP updates (the units of an
  update are ``"<stack>.<g>"``, g the global expert id); weights, gradients and optimizer states are
  masked with the whole ``[E, ...]`` mask. Not with Top-KAST (refused, naming the stack).
- An expert-parallel stack (``ep_size > 1``: this rank holds ``E/ep_size`` of the E experts) is masked
  per local slice, and what must agree for an expert agrees whatever the expert-parallel size: the
  per-expert counts come from the global ``[E, ...]`` shape, the initial random mask and SET's regrowth
  are drawn from a generator of the GLOBAL expert id (:func:`.stacked.expert_generator`), and RigL
  grows by that expert's gradient averaged over its replicas (``expert_group``, given or derived from
  the layers' expert-parallel groups; the owner's own when there are none). Its slices are selected in
  groups of their own, reduced over ``expert_group``, not over the world.
  :meth:`DynamicSparsifier.check_ranks` compares them only between replicas;
  :meth:`DynamicSparsifier.state_dict` holds them whole by global id, so they re-shard on load;
  :meth:`DynamicSparsifier.statistics` counts this rank's experts.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .. import _warn, contract
from ._sole_owner import sole_owner, sole_refs
from .config import MATH_FIELDS, DynamicSparsityConfig
from .density import floor_count, layer_active_counts
from .enforcement import optimizer_blocker
from .masks import random_mask
from .schedules import MaskSchedule
from .stacked import (
    _root,
    expert_generator,
    expert_parallel_layer,
    expert_random_masks,
    resolve_expert_group,
    select_layers_and_stacks,
    stack_active_counts,
)
from .update import GroupKey, group_layers, growth_scores, host_ints, nonfinite, reduced_dense_grads, update_groups

__all__ = [
    "MASK_NAME",
    "MATH_FIELDS",
    "DynamicSparsifier",
    "DynamicSparsityConfig",
    "MaskDivergenceError",
]

MASK_NAME = "weight_mask"
_STATE_VERSION = 2
class MaskDivergenceError(contract.RankDivergenceError):
    """Masks differ across ranks (raised on every rank by :meth:`DynamicSparsifier.check_ranks`)."""


def _check_total_steps(total_steps: Any) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, float)) \
            or not math.isfinite(total_steps) or total_steps != int(total_steps) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an int >= 1, got {total_steps!r}")


def _warn_unreachable(shapes: dict[str, tuple[int, ...]], counts: dict[str, int], sparsity: float) -> None:
    """Warn when layers too small for ``sparsity`` (each keeps at least one weight) leave it unreached."""
    total = sum(math.prod(s) for s in shapes.values())
    achieved = 1.0 - sum(counts.values()) / total
    if sparsity - achieved <= 1.0 / total + 1e-9:
        return
    worst = sorted(shapes, key=lambda n: counts[n] / math.prod(shapes[n]), reverse=True)
    short = [f"{n} ({1.0 - counts[n] / math.prod(shapes[n]):.3g})" for n in worst
             if 1.0 - counts[n] / math.prod(shapes[n]) < sparsity - 1e-9]
    _warn.warn(
        f"sparsity={sparsity} cannot be reached: every layer keeps at least one weight, and the sparsity reached "
        f"over the sparsified layers is {achieved:.4g}; layers below the target (achieved sparsity): "
        f"{', '.join(short[:8])}{', ...' if len(short) > 8 else ''}. statistics()['sparsity/global'] reports the "
        "achieved value",
        stacklevel=4,
    )


def _param_name(module_name: str) -> str:
    """The parameter name of a layer's weight (``"blocks.0.fc"`` -> ``"blocks.0.fc.weight"``)."""
    return f"{module_name}.weight" if module_name else "weight"


class DynamicSparsifier:
    """Masks, enforces and updates the sparsity of a model's weights during training.

    Follows the component contract of ``docs/architecture.md``: construction attaches it to the
    model (:func:`sparsetrain.contract.attach`, claiming the weights it masks), :meth:`step` after
    every optimizer step, :meth:`statistics`, :meth:`masks`, versioned :meth:`state_dict`,
    :meth:`check_ranks` and :meth:`remove`. It masks gradients (``masks_gradients``): a component
    keeping gradient state of its own reads :meth:`masks` and :attr:`mask_version` through
    :func:`sparsetrain.contract.gradient_masks`.

    Args:
        model: the model (not yet wrapped in DDP, so that the masks can be excluded from
            DDP's buffer broadcast; wrapping it afterwards is fine).
        config: what to sparsify and how; or give its fields as keywords instead (not both).
        optimizer: optional optimizer to attach at once (see :meth:`attach_optimizer`).
        process_group: group for the cross-rank reductions (default: the default group when
            ``torch.distributed`` is initialised with more than one rank).
        total_steps: optimizer steps in the whole run; may be given later with
            :meth:`set_total_steps` (the Lightning callback does), but before the first step.
        hook_optimizer: with ``optimizer``, register a step-post hook that calls :meth:`step`;
            ``False`` means the loop calls :meth:`step` right after ``optimizer.step()``.
        expert_group: the expert-data-parallel group of this rank (the ranks that hold the same experts:
            ``sparsetrain.moe.expert_data_parallel_groups(P)[1]``), for expert-parallel stacks whose experts
            have replicas (world size > ``ep_size``). None (the default) derives it from the stacks' own
            expert-parallel groups (:func:`sparsetrain.moe.derive_expert_data_parallel_group`: one small
            all-gather, and ``ep_size`` new groups where there are replicas; every rank constructs the
            sparsifier, as always); it stays None where each expert has one rank.
        **config_fields: the fields of :class:`DynamicSparsityConfig`, when ``config`` is not given.

    Raises:
        TypeError: ``config`` is not a :class:`DynamicSparsityConfig`.
        ValueError: both ``config`` and config fields, a filter matching no layer, a layer claimed by
            another component, a module that already has a ``weight_mask``, an expert stack selected with
            ``method="topkast"``, an ``expert_group`` whose size is not world size / ``ep_size``, or, with
            ``expert_group`` None, expert-parallel stacks whose groups are not one consistent layout (stacks
            over different ranks, groups of different sizes or that do not partition the world) or a
            ``process_group`` smaller than the default group when their experts have replicas.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sp = DynamicSparsifier(model, method="set", sparsity=0.5, update_every=2, total_steps=10, optimizer=opt)
        >>> sorted(sp.masks())
        ['0.weight', '2.weight']
        >>> round(sp.statistics()["sparsity/global"], 3)
        0.5
    """

    #: Gradients outside :meth:`masks` are zeroed before anything else reads them (the contract).
    masks_gradients = True
    #: The buffer outside which gradients are zeroed (Top-KAST: its backward set).
    _grad_mask_name = MASK_NAME
    #: The config fields a saved state must agree on (Top-KAST adds its own).
    _math_fields = MATH_FIELDS

    def __new__(cls, model: Any = None, config: Any = None, *args: Any, **kwargs: Any) -> DynamicSparsifier:
        method = getattr(config, "method", None) if config is not None else kwargs.get("method")
        if cls is DynamicSparsifier and method == "topkast":  # the Top-KAST sparsifier of .topkast
            from .topkast import TopKastSparsifier

            cls = TopKastSparsifier
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        config: DynamicSparsityConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        process_group: Any = None,
        total_steps: int | None = None,
        hook_optimizer: bool = True,
        expert_group: Any = None,
        **config_fields: Any,
    ) -> None:
        if config is None:
            config = DynamicSparsityConfig(**config_fields)
        elif config_fields:
            raise ValueError(
                f"give either `config` or its fields as keywords, not both (got `config` and {sorted(config_fields)})"
            )
        if not isinstance(config, DynamicSparsityConfig):
            raise TypeError(f"`config` must be a DynamicSparsityConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if total_steps is not None:
            _check_total_steps(total_steps)
        # configuration
        self.model = model
        self.config = config
        self.process_group = process_group
        self.schedule: MaskSchedule | None = None
        # internal state
        self._modules: dict[str, nn.Module] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._state_maskers: list[Callable[[list[tuple[nn.Parameter, torch.Tensor]]], None]] = []
        self._handles: list[Any] = []
        self._optimizer_handles: list[Any] = []
        self._step_hook_optimizer: torch.optim.Optimizer | None = None
        self._step_hook_handle: Any = None
        self._hooked: set[str] = set()  # layers whose gradient hook is in place
        self._coverage: tuple[tuple[tuple[int, int], ...], list[str]] | None = None
        self._ddp_ignored: list[str] = []  # names this sparsifier added to `_ddp_params_and_buffers_to_ignore`
        self._removed = False
        self._generator = torch.Generator().manual_seed(config.seed)
        self._step = 0
        self._capture = False
        # grad_masking="step": per layer, the gradient last masked and its version after masking; and
        # whether this step's dense gradients were captured
        self._masked_grads: dict[str, tuple[weakref.ref, int]] = {}
        self._captured = False
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._bits = contract.BitMasks()
        self._fingerprints: tuple[tuple[tuple[int, int], ...], dict[str, torch.Tensor]] | None = None
        self._refs = sole_refs()
        self._device_generators: dict[torch.device, torch.Generator | None] = {}
        #: Incremented at every mask change (an update that changed a mask, a model or sparsifier load).
        self.mask_version = 0
        # statistics (the counts are kept on the host, so that reading them never waits for the device)
        self._active: dict[str, int] = {}
        self._ever_active: dict[str, torch.Tensor] = {}
        self._ever_counts: dict[str, int] = {}
        self._updates = 0
        self._regrown_total = 0
        self._last_update = {"regrown": 0, "drop_fraction": 0.0, "target": None}

        layers, stacks = select_layers_and_stacks(
            model, include=config.include, exclude=config.exclude, module_types=config.module_types,
            keep_first_dense=config.keep_first_dense, keep_last_dense=config.keep_last_dense,
        )
        for name, (module, attr) in stacks.items():
            if config.method == "topkast":
                raise ValueError(f"expert stack {name!r}: method='topkast' does not sparsify stacked expert weights; "
                                 "leave them out of `include`, or use rigl, set, gmp or static")
            if f"{attr}_mask" in module._buffers or hasattr(module, f"{attr}_mask"):
                raise ValueError(f"expert stack {name!r} already has a `{attr}_mask` (sparsified twice?)")
        for name, module in layers.items():
            if MASK_NAME in module._buffers or hasattr(module, MASK_NAME):
                raise ValueError(f"module {name!r} already has a `{MASK_NAME}` (sparsified twice, or pruned?)")
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(
                    f"module {name!r} has a parametrized `weight` (masked by another component, e.g. N:M?): one "
                    "layer can be masked by one component only; leave it out with `include` / `exclude`"
                )
        # Layers by module name (their `weight`, masked by a `weight_mask` buffer) and expert stacks by
        # parameter name (`<module>.w1_EFD`, masked per expert slice by a `w1_EFD_mask` buffer of the module),
        # in registration order of the modules (a stack at its owning module, in parameter order).
        order = {m: i for i, m in enumerate(_root(model).modules())}
        merged = [(order[m], 0, name, m) for name, m in layers.items()]
        merged += [(order[m], 1 + i, name, m) for i, (name, (m, _)) in enumerate(stacks.items())]
        self._modules = {name: m for _, _, name, m in sorted(merged, key=lambda r: r[:2])}
        self._attrs: dict[str, tuple[str, str]] = {name: ("weight", MASK_NAME) for name in layers}
        self._attrs.update({name: (attr, f"{attr}_mask") for name, (_, attr) in stacks.items()})
        self._stacked: dict[str, int] = {}  # expert stack -> E
        self._slice_expected: dict[str, list[int]] = {}  # expert stack -> kept positions per expert
        self._slice_active: dict[str, list[int]] = {}
        # Expert-parallel stacks (this rank holds the experts `_expert_ids[name]` of E): the layer that holds
        # each, and the global shapes (`[E, ...]`) that the per-expert counts are computed from.
        self._sharded = {name: layer for name in stacks if (layer := expert_parallel_layer(model, name)) is not None}
        self.expert_group = resolve_expert_group(self._sharded, expert_group, self._world())
        contract.attach(model, self, claimed=[self._param_key(name) for name in self._modules])
        self._shapes = {name: tuple(self._weight(name).shape) for name in self._modules}
        self._stacked = {name: self._shapes[name][0] for name in stacks}
        self._expert_ids = {name: (self._sharded[name].local_expert_ids() if name in self._sharded
                                   else range(self._stacked[name])) for name in stacks}
        self._global_shapes = {name: (self._sharded[name].num_experts, *s[1:]) if name in self._sharded else s
                               for name, s in self._shapes.items()}
        start = 0.0 if config.method == "gmp" else float(config.sparsity)  # GMP starts dense
        counts = self._counts_at(start)
        for name in self._stacked:
            self._slice_expected[name] = list(counts[name])
            self._slice_active[name] = list(counts[name])
            counts[name] = sum(counts[name])
        self._expected_counts = dict(counts)
        if config.method != "gmp":
            every = stack_active_counts(self._global_shapes, self._stacked, start, config.distribution)
            _warn_unreachable(self._global_shapes, {n: sum(c) if n in self._stacked else c for n, c in every.items()},
                              float(config.sparsity))
        for name, module in self._modules.items():
            w = self._weight(name)
            if name in self._stacked:  # one generator per global expert id: the same mask at any ep_size
                gens = [expert_generator(config.seed, name, g) for g in self._expert_ids[name]]
                mask = expert_random_masks(w.shape, self._slice_expected[name], gens, w.device)
            else:
                mask = random_mask(w.shape, counts[name], self._generator, w.device)
            module.register_buffer(self._attrs[name][1], mask, persistent=True)
            self._ever_active[name] = mask.clone()
            self._active[name] = self._ever_counts[name] = counts[name]
            if w.requires_grad:
                if config.grad_masking == "hook":
                    self._handles.append(w.register_hook(self._make_grad_hook(name)))
                self._hooked.add(name)  # with "step": masked by the attached optimizers' pre-hooks
        root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._handles.append(root.register_load_state_dict_pre_hook(self._before_load))
        self._handles.append(model.register_load_state_dict_post_hook(self._after_load))
        self._exclude_masks_from_ddp()
        if total_steps is not None:
            self.set_total_steps(total_steps)
        if optimizer is not None:
            self.attach_optimizer(optimizer, hook=hook_optimizer)
        self.apply_masks()

    # ------------------------------------------------------------------ layers and expert stacks

    def _counts_at(self, sparsity: float) -> dict[str, int | list[int]]:
        """Kept positions per layer at ``sparsity`` (0: all), from the GLOBAL shapes; an expert stack gets
        one count per expert this rank holds (so an expert's count does not depend on the ep_size)."""
        counts = stack_active_counts(self._global_shapes, self._stacked, sparsity, self.config.distribution)
        return {n: [c[g] for g in self._expert_ids[n]] if n in self._stacked else c for n, c in counts.items()}

    def _weight(self, name: str) -> torch.Tensor:
        """Layer ``name``'s masked parameter (a module's ``weight``, or an expert stack)."""
        return getattr(self._modules[name], self._attrs[name][0])

    def _mask(self, name: str) -> torch.Tensor:
        """Layer ``name``'s mask buffer."""
        return self._modules[name]._buffers[self._attrs[name][1]]

    def _param_key(self, name: str) -> str:
        """The parameter name of layer ``name`` (``"blocks.0.fc.weight"``; an expert stack is named so already)."""
        return _param_name(name) if self._attrs[name][0] == "weight" else name

    def _mask_key(self, name: str) -> str:
        """The model state-dict key of layer ``name``'s mask (relative to the model)."""
        if self._attrs[name][0] != "weight":
            return f"{name}_mask"
        return f"{name}.{MASK_NAME}" if name else MASK_NAME

    def _grad_mask_key(self, name: str) -> str:
        """The buffer outside which layer ``name``'s gradient is zeroed."""
        return self._grad_mask_name if self._attrs[name][0] == "weight" else self._attrs[name][1]

    # ------------------------------------------------------------------ wiring

    def _exclude_masks_from_ddp(self) -> None:
        prefix = {m: n for n, m in self.model.named_modules()}
        names = []
        for name, m in self._modules.items():
            buf = self._attrs[name][1]
            names.append(f"{prefix[m]}.{buf}" if prefix[m] else buf)
        existing = list(getattr(self.model, "_ddp_params_and_buffers_to_ignore", []))
        self._ddp_ignored = [n for n in names if n not in existing]
        self.model._ddp_params_and_buffers_to_ignore = existing + self._ddp_ignored
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            _warn.warn(
                "DynamicSparsifier was given a DDP-wrapped model: DDP will broadcast the masks from rank 0 "
                "every forward. Attach the sparsifier to the module before wrapping it.",
                stacklevel=3,
            )

    def _make_grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
        buffers = self._modules[name]._buffers
        refs = self._refs
        key = self._grad_mask_key(name)

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            if self._capture:
                buf = self._dense_grads.get(name)
                if buf is None:
                    self._dense_grads[name] = grad.detach().clone()
                else:
                    buf.add_(grad.detach())
            if sole_owner(grad, sys.getrefcount(grad), refs):  # the usual case: no new tensor
                contract.mask_(grad, buffers[key], self._bits)
                return None
            return contract.masked(grad, buffers[key], self._bits)

        return hook

    def _before_load(self, module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        """Refuse a model state whose masks are not masks this sparsifier could hold (before anything loads)."""
        for name in self._modules:
            key = f"{prefix}{self._mask_key(name)}"
            if key in state_dict:
                self.check_mask(name, self._local(name, state_dict[key]), what=f"`state_dict[{key!r}]`")

    def _local(self, name: str, t: Any) -> Any:
        """This rank's experts of ``t`` when it is the whole ``[E, ...]`` stack of an expert-parallel stack
        (global expert id = index along dim 0; the MoE layer loads such a state too), else ``t``."""
        if name in self._sharded and isinstance(t, torch.Tensor) and tuple(t.shape) == self._global_shapes[name]:
            ids = self._expert_ids[name]
            return t[ids.start:ids.stop]
        return t

    def _full(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The whole ``[E, ...]`` stack of an expert-parallel stack's local ``t``, all-gathered over the layer's
        expert-parallel group (collective), else ``t``."""
        if name not in self._sharded:
            return t
        from ..moe.parallel import gather_expert_stack  # the moe package imports this one

        return gather_expert_stack(self._sharded[name], t)

    def check_mask(self, layer: str, mask: Any, *, what: str | None = None) -> None:
        """Check that ``mask`` can be layer ``layer``'s mask: a bool tensor of the weight's shape whose
        number of kept weights fits the configured sparsity (RigL, SET and static keep a fixed count
        per layer; GMP at least its final count).

        Raises:
            ValueError: naming the mask and what is wrong with it.
        """
        what = what or f"the `{self._attrs[layer][1]}` of layer {layer!r}"
        shape = self._shapes[layer]
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"{what} must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"{what} must be a bool tensor (True = kept), got {mask.dtype}: a float mask would be "
                             "read as dense wherever it is nonzero")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(mask.shape)}, the weight of layer {layer!r} has {shape}")
        if layer in self._stacked:
            self._check_stack_mask(layer, mask, what)
            return
        kept, numel = int(mask.sum()), mask.numel()
        expected = self._expected_counts[layer]
        if kept == 0:
            raise ValueError(f"{what} keeps no weight (all False): the layer would be dead; expected {expected} of "
                             f"{numel} kept for sparsity={self.config.sparsity}")
        if self.config.method == "gmp":
            final = self._counts_at(float(self.config.sparsity))[layer]
            if kept < final:
                raise ValueError(f"{what} keeps {kept} of {numel} weights, fewer than the {final} that GMP keeps at "
                                 f"its final sparsity={self.config.sparsity}")
        elif kept != expected:
            raise ValueError(f"{what} keeps {kept} of {numel} weights (density {kept / numel:.4g}), but "
                             f"method={self.config.method!r} at sparsity={self.config.sparsity} keeps exactly "
                             f"{expected} in this layer: was it saved with another sparsity or distribution?")

    def _check_stack_mask(self, layer: str, mask: torch.Tensor, what: str) -> None:
        """:meth:`check_mask` for an expert stack: every expert slice keeps its own count."""
        kept = [int(c) for c in mask.reshape(mask.shape[0], -1).sum(dim=1).tolist()]
        numel = math.prod(mask.shape[1:])
        final = (self._counts_at(float(self.config.sparsity))[layer] if self.config.method == "gmp"
                 else self._slice_expected[layer])
        for e, k, want in zip(self._expert_ids[layer], kept, final):
            if k == 0:
                raise ValueError(f"{what} keeps no weight of expert {e} (all False): the expert would be dead; "
                                 f"expected {want} of {numel} kept for sparsity={self.config.sparsity}")
            if self.config.method == "gmp" and k < want:
                raise ValueError(f"{what} keeps {k} of {numel} weights of expert {e}, fewer than the {want} that "
                                 f"GMP keeps at its final sparsity={self.config.sparsity}")
            if self.config.method != "gmp" and k != want:
                raise ValueError(f"{what} keeps {k} of {numel} weights of expert {e} (density {k / numel:.4g}), but "
                                 f"method={self.config.method!r} at sparsity={self.config.sparsity} keeps exactly "
                                 f"{want} in each slice of this stack: was it saved with another sparsity or "
                                 "distribution?")

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.mask_version += 1  # the masks may have been replaced
        self._recount()
        self.apply_masks()

    def _recount(self, ever: bool = False) -> None:
        """Re-read the active (and ever-active) counts from the masks, in one device-to-host copy."""
        names = list(self._modules)
        counted = [torch.count_nonzero(self._mask(n)) for n in names]
        stacks = list(self._stacked)
        counted += [torch.count_nonzero(self._mask(n).reshape(self._stacked[n], -1), dim=1) for n in stacks]
        if ever:
            counted += [torch.count_nonzero(self._ever_active[n]) for n in names]
        values = host_ints(counted)
        self._active = dict(zip(names, values[: len(names)]))
        start = len(names)
        for n in stacks:
            self._slice_active[n] = values[start:start + self._stacked[n]]
            start += self._stacked[n]
        if ever:
            self._ever_counts = dict(zip(names, values[start:]))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> None:
        """Mask this optimizer's same-shape states whenever masks are enforced; optionally drive :meth:`step`.

        The weights and states are enforced at once, and again after every ``optimizer.load_state_dict``
        (a load post-hook). Whether enforcement also runs after every step depends on
        ``config.enforce_interval`` and on the optimizer's class (see :attr:`effective_enforce_interval`).

        Args:
            optimizer: a ``torch.optim.Optimizer`` holding (some of) the sparsified weights.
            hook: register ``optimizer.register_step_post_hook`` to call :meth:`step` after each
                ``optimizer.step()``. At most one optimizer may drive the step count.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            ValueError: it holds none of the sparsified weights, or a second one asks for the hook.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(self._weight(n)) in held for n in self._modules):
            raise ValueError("`optimizer` holds none of the sparsified weights")
        if hook and self._step_hook_optimizer is not None:
            raise ValueError("`hook=True` for a second optimizer: only one optimizer may drive the mask steps")
        if all(optimizer is not o for o in self._optimizers):
            self._optimizers.append(optimizer)
            self._optimizer_handles.append(optimizer.register_load_state_dict_post_hook(self._after_optimizer_load))
            if self.config.grad_masking == "step":
                self._optimizer_handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
        if hook:
            self._step_hook_optimizer = optimizer
            self._step_hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        self.apply_masks()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """With ``grad_masking="step"``: zero every sparsified weight's gradient outside its mask, in
        place, once per optimizer step (later calls before :meth:`step` do nothing); on steps before
        a RigL update the dense gradients are kept first. The attached optimizers call it before
        each step; call it yourself before clipping gradients. Calling it again before the step
        is harmless: the dense gradients are kept at the first call of a step only, and a gradient
        masked and not written since is left alone. With ``"hook"`` it does
        nothing (the gradients are masked as they are computed).
        """
        if self.config.grad_masking != "step":
            return
        # The dense gradients once per step, before masking. (An optimizer given a closure, as
        # Lightning's are, runs its pre-hook before the closure's backward: no gradients yet.)
        capture = self._capture and not self._captured
        for name, module in self._modules.items():
            g = self._weight(name).grad
            if g is None:
                continue
            if capture:
                self._dense_grads[name] = g.detach().clone()
                self._captured = True
            seen = self._masked_grads.get(name)
            if seen is not None and seen[0]() is g and seen[1] == g._version:
                continue  # masked already, and not written since (a second call before the step)
            contract.mask_(g, module._buffers[self._grad_mask_key(name)], self._bits)
            self._masked_grads[name] = (weakref.ref(g), g._version)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        """``grad_masking="step"``: mask the gradients before the step; a step given a closure (which
        computes the gradients inside ``step``, as Lightning's do) gets one that masks them after it."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is None:
            self.mask_gradients()
            return None

        def masking_closure():
            loss = closure()
            self.mask_gradients()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masking_closure}
        return (args[0], masking_closure, *args[2:]), kwargs

    def _after_optimizer_load(self, optimizer: torch.optim.Optimizer) -> None:
        self.apply_masks()

    def detach_optimizers(self) -> None:
        """Forget every attached optimizer and remove its hooks (e.g. before attaching a new one)."""
        if self._step_hook_handle is not None:
            self._step_hook_handle.remove()
        self._step_hook_handle = None
        self._step_hook_optimizer = None
        for h in self._optimizer_handles:
            h.remove()
        self._optimizer_handles.clear()
        self._optimizers.clear()
        self._coverage = None

    def add_state_masker(self, masker: Callable[[list[tuple[nn.Parameter, torch.Tensor]]], None]) -> None:
        """Register ``masker(pairs)``, called with ``[(weight, mask), ...]`` whenever masks are enforced.

        For state the sparsifier cannot see: e.g. the fp32 master weights of a DeepSpeed ZeRO
        optimizer (:mod:`sparsetrain.sparsity.deepspeed`).
        """
        self._state_maskers.append(masker)
        masker(self._pairs())

    def remove(self) -> None:
        """Leave a plain model: remove every hook, the ``weight_mask`` buffers and the names added to
        DDP's ignore list, and detach from the model. The weights keep their current (masked) values.

        The sparsifier cannot be used afterwards (:meth:`masks` is then empty).
        """
        if self._removed:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        self.detach_optimizers()
        self._capture = False
        self._dense_grads.clear()
        self._masked_grads.clear()
        for name, module in self._modules.items():
            module._buffers.pop(self._attrs[name][1], None)
        ignored = getattr(self.model, "_ddp_params_and_buffers_to_ignore", None)
        if ignored is not None:
            kept = [n for n in ignored if n not in set(self._ddp_ignored)]
            if kept:
                self.model._ddp_params_and_buffers_to_ignore = kept
            else:
                del self.model._ddp_params_and_buffers_to_ignore
        self._ddp_ignored = []
        self._bits.clear()
        contract.detach(self.model, self)
        self._removed = True
        self._modules = {}

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length (and hence the schedule); must happen before the first :meth:`step`.

        Raises:
            ValueError: ``total_steps`` is not a whole number >= 1.
        """
        _check_total_steps(total_steps)
        self.set_schedule(self.config.schedule(int(total_steps)))

    def set_schedule(self, schedule: MaskSchedule) -> None:
        """Use an explicit schedule (e.g. the one restored from a checkpoint)."""
        if not isinstance(schedule, MaskSchedule):
            raise TypeError(f"`schedule` must be a MaskSchedule, got {type(schedule).__name__}")
        if schedule.method != self.config.method:
            raise ValueError(f"`schedule.method` is {schedule.method!r} but the config says {self.config.method!r}")
        self.schedule = schedule
        if schedule.method in ("rigl", "set", "gmp", "topkast") and not schedule.update_steps():
            _warn.warn(
                f"no mask update fits in {schedule.total_steps} steps (update_every={schedule.update_interval}, "
                f"steps {schedule.begin_step}..{schedule.end_step}): the masks stay as initialised",
                stacklevel=2,
            )
        self._capture = schedule.needs_gradient(self._step + 1)

    # ------------------------------------------------------------------ views

    @property
    def step_count(self) -> int:
        """Optimizer steps seen so far."""
        return self._step

    @property
    def layer_names(self) -> list[str]:
        """Names of the sparsified modules."""
        return list(self._modules)

    def needs_dense_gradient(self) -> bool:
        """Whether the gradient exchange of the coming step must deliver dense gradients (outside the masks too).

        True before a RigL update step (``schedule.needs_gradient``) with ``grad_masking="step"``,
        where the dense gradient is taken after DDP's averaging. With ``"hook"`` the gradient hooks
        keep the local dense gradient before masking and the update all-reduces it itself, so a
        sparsity-aware exchange may stay packed (False).
        """
        return self._capture and self.config.grad_masking == "step"

    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name (``"<module name>.weight"``) -> its current bool mask, ``True`` = kept.

        An expert stack is keyed by its parameter name (``"blocks.0.mlp.experts.w1_EFD"``) and its mask
        has the stack's ``[E, ...]`` shape (slice e: expert e's mask). Live tensors (the ``weight_mask``
        / ``<stack>_mask`` buffers): do not modify them.
        """
        return {self._param_key(name): self._mask(name) for name in self._modules}

    def _layer_masks(self) -> dict[str, torch.Tensor]:
        """Layer name -> its current mask buffer."""
        return {name: self._mask(name) for name in self._modules}

    @property
    def effective_enforce_interval(self) -> int | None:
        """Optimizer steps between enforcement passes as things stand now.

        ``None`` when ``enforce_interval="auto"`` skips the per-step pass (masks are then enforced
        only at attach, mask updates and loads); otherwise the configured ``N``, or 1 when auto mode
        cannot prove the pass redundant (:meth:`enforcement_reason` says why).
        """
        n = self.config.enforce_interval
        if n != "auto":
            return int(n)
        return None if self._auto_blocker() is None else 1

    def enforcement_reason(self) -> str:
        """In words, why masks are (or need not be) enforced after every step."""
        n = self.config.enforce_interval
        if n != "auto":
            return f"enforce_interval={n}: a full pass after every {'' if n == 1 else f'{n}-th '}optimizer step"
        blocker = self._auto_blocker()
        if blocker is None:
            names = ", ".join(sorted({type(o).__name__ for o in self._optimizers}))
            return (f"auto: no per-step pass ({names} in ZERO_PRESERVING_OPTIMIZERS); a full pass at attach, "
                    "mask updates and loads")
        return f"auto: a full pass after every optimizer step because {blocker}"

    def _auto_blocker(self) -> str | None:
        """What makes the per-step pass necessary in auto mode, or ``None`` (cheap: runs every step)."""
        if self._state_maskers:
            return "state maskers are registered (e.g. DeepSpeed master weights)"
        blocker = optimizer_blocker(self._optimizers)
        if blocker is not None:
            return blocker
        signature = tuple((id(o), len(o.param_groups)) for o in self._optimizers)
        if self._coverage is None or self._coverage[0] != signature:
            held = {id(p) for o in self._optimizers for g in o.param_groups for p in g["params"]}
            exposed = [n for n in self._modules if n not in self._hooked or id(self._weight(n)) not in held]
            self._coverage = (signature, exposed)
        for name in self._coverage[1]:  # usually none: every trainable weight hooked and held
            if self._weight(name).requires_grad:
                why = "has no gradient hook" if name not in self._hooked else "is in no attached optimizer"
                return f"the trainable weight of {name!r} {why}"
        return None

    def _pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(self._weight(n), self._mask(n)) for n in self._modules]

    def _iter_state_tensors(self, weight: nn.Parameter) -> Iterator[torch.Tensor]:
        for opt in self._optimizers:
            state = opt.state.get(weight)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    yield value

    # ------------------------------------------------------------------ enforcement

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every sparsified weight and its same-shape optimizer states outside the mask."""
        for name in self._modules:
            weight, mask = self._weight(name), self._mask(name)
            contract.mask_(weight, mask, self._bits)
            for state in self._iter_state_tensors(weight):
                contract.mask_(state, mask, self._bits)
        if self._state_maskers:
            pairs = self._pairs()
            for masker in self._state_maskers:
                masker(pairs)

    def step(self) -> None:
        """Account for one optimizer step: update the masks if the schedule says so, else enforce them if due.

        Call right after ``optimizer.step()`` (the hook installed by :meth:`attach_optimizer` does).
        The figures of the latest update are in :meth:`statistics`.

        Raises:
            RuntimeError: no schedule yet (:meth:`set_total_steps` was not called), or removed.
            MaskDivergenceError: with ``verify_every``, the masks differ across ranks.
        """
        if self.schedule is None:
            raise RuntimeError("DynamicSparsifier.step() before the run length is known: call set_total_steps()")
        if self._removed:
            raise RuntimeError("DynamicSparsifier.step() after remove()")
        self._captured = False
        self._step += 1
        t = self._step
        updated = self.schedule.is_update_step(t)
        if updated:
            self._update(t)  # ends with a full enforcement
        else:
            self._enforce_if_due(t)
        self._capture = self.schedule.needs_gradient(t + 1)
        k = self.config.verify_every
        if k and (updated or t % k == 0):
            self.check_ranks()

    def _enforce_if_due(self, t: int) -> None:
        """The per-step part of the enforcement, after optimizer step ``t`` without a mask update."""
        n = self.effective_enforce_interval
        if n is not None and t % n == 0:
            self.apply_masks()

    # ------------------------------------------------------------------ updates

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    #: Group the CPU layers in mask updates too (see :mod:`.update`: on the CPU, where the update is bound
    #: by memory traffic, a group's stacked copies cost more than the operations they save).
    _group_on_cpu = False

    def _weights(self) -> dict[str, torch.Tensor]:
        return {name: self._weight(name) for name in self._modules}

    def _groups(self, counts: dict[str, int]) -> dict[GroupKey, list[str]]:
        """Layers that can be updated together (:func:`.update.group_layers`)."""
        return group_layers(self._weights(), self._active, counts, group_on_cpu=self._group_on_cpu)

    @torch.no_grad()
    def _update(self, t: int) -> None:
        cfg, sched = self.config, self.schedule
        assert sched is not None
        method = cfg.method
        drop = sched.drop_fraction_at(t) if method in ("rigl", "set") else 0.0
        # The units of an update: every layer, and every expert slice of a stack (`"<stack>.<g>"`, g its
        # global expert id) on its own.
        weights_u, masks_u, ever_u, active_u = self._units()
        if method == "gmp":
            target = sched.sparsity_at(t)
            if self._stacked:
                counts = {}
                for name, c in self._counts_at(target).items():
                    counts.update(dict(zip(self._unit_names(name), c)) if name in self._stacked else {name: c})
            elif target == 0.0:
                counts = {name: math.prod(s) for name, s in self._shapes.items()}
            else:
                counts = layer_active_counts(self._shapes, target, cfg.distribution)
        else:  # positions each layer drops (and grows)
            counts = {u: floor_count(drop * active_u[u]) for u in weights_u}
        # Layers alike are updated together, a few passes per group rather than per layer (the same
        # masks: selections are exact). The active counts are known on the host, so beyond the
        # finiteness check (one multi-tensor reduction and one copy of a number per layer, before
        # anything changes) nothing waits for the device until the one copy of the per-layer counts
        # at the end.
        weights = self._weights()
        bad = nonfinite(weights)
        if bad:
            raise ValueError(
                f"mask update at step {t}: the weights of layer(s) {', '.join(bad)} hold NaN or inf; a {method} "
                "update would rank them arbitrarily. Fix the divergence (learning rate, loss scaling) or resume from "
                "an earlier checkpoint"
            )
        # The slices of expert-parallel stacks form groups of their own (keys marked "experts"): their
        # gradients are reduced over the expert's replicas, not over the world.
        experts_u = {u for u in weights_u if self._layer_of(u) in self._sharded}
        groups = group_layers({u: w for u, w in weights_u.items() if u not in experts_u}, active_u, counts,
                              group_on_cpu=self._group_on_cpu)
        expert_groups = {(*key, "experts"): names for key, names in group_layers(
            {u: weights_u[u] for u in weights_u if u in experts_u}, active_u, counts,
            group_on_cpu=self._group_on_cpu).items()}
        grads = scores = {}
        if method == "rigl":  # with grad_masking="step", DDP (and the experts' own reduction) averaged them already
            dense = {}
            for name, g in self._dense_grads.items():
                dense.update(dict(zip(self._unit_names(name), g.unbind(0))) if name in self._stacked else {name: g})
            self._dense_grads.clear()
            hook = cfg.grad_masking == "hook"
            grads = reduced_dense_grads(groups, weights_u, {u: g for u, g in dense.items() if u not in experts_u},
                                        process_group=self.process_group, all_reduce=hook)
            # an expert's gradient: the mean over the ranks holding it (its own, without replicas). Averaged here
            # with grad_masking="step" too: the experts' own reduction may run after the capture (a LightningModule
            # reducing them in `on_before_optimizer_step`, after the callback's), and averaging replicas that
            # were reduced already leaves them as they were (up to rounding, the same on every replica)
            grads.update(reduced_dense_grads(expert_groups, weights_u, {u: dense[u] for u in experts_u if u in dense},
                                             process_group=self.expert_group,
                                             all_reduce=self.expert_group is not None))
        groups.update(expert_groups)
        if method == "set":  # an expert slice draws from a generator of its global id and the step
            own = {u: expert_generator(cfg.seed, self._layer_of(u), int(u.rsplit(".", 1)[1]), t)
                   for u in weights_u if u not in self._modules}
            scores = growth_scores(groups, weights_u, self._generator, self._device_generators, own)
        counted, changed = update_groups(method, groups, weights_u, masks_u, ever_u, active_u, grads, scores)
        if method == "gmp" and self._stacked:  # the active counts of the units, back to the layers
            for name in self._modules:
                if name in self._stacked:
                    self._slice_active[name] = [active_u[u] for u in self._unit_names(name)]
                    self._active[name] = sum(self._slice_active[name])
                else:
                    self._active[name] = active_u[name]
        # Newly grown connections were inactive, so their weights and optimizer states are already 0.
        self.apply_masks()
        regrown = 0
        flat = host_ints(counted)
        start = 0
        for names in changed:
            n = len(names)
            regrown += sum(flat[start:start + n])
            for name, first_time in zip(names, flat[start + n:start + 2 * n]):
                self._ever_counts[self._layer_of(name)] += first_time
            start += 2 * n
        self._updates += 1
        self._regrown_total += regrown
        # A mask changed when a layer was pruned (gmp) or a connection grown (rigl, set: as many dropped).
        if regrown or (method == "gmp" and changed):
            self.mask_version += 1
        self._last_update = {"regrown": regrown, "drop_fraction": float(drop), "target": sched.sparsity_at(t)}

    def _units(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor],
                              dict[str, int]]:
        """The units a mask update selects within, in layer order: each layer, and each slice of an expert
        stack as ``"<stack>.<g>"`` (g: the global expert id): ``(weights, masks, ever_active, active counts)``,
        views of the stacks."""
        if not self._stacked:
            return self._weights(), self._layer_masks(), self._ever_active, self._active
        weights, masks, ever, active = {}, {}, {}, {}
        for name in self._modules:
            w, m, a = self._weight(name), self._mask(name), self._ever_active[name]
            if name in self._stacked:
                for e, u in enumerate(self._unit_names(name)):
                    weights[u], masks[u], ever[u], active[u] = w[e], m[e], a[e], self._slice_active[name][e]
            else:
                weights[name], masks[name], ever[name], active[name] = w, m, a, self._active[name]
        return weights, masks, ever, active

    def _unit_names(self, stack: str) -> list[str]:
        """The update units of an expert stack, by global expert id, in local order: ``"<stack>.<g>"``."""
        return [f"{stack}.{g}" for g in self._expert_ids[stack]]

    def _layer_of(self, unit: str) -> str:
        """The layer of an update unit (an expert slice ``"<stack>.<g>"`` -> ``"<stack>"``)."""
        if unit in self._modules:
            return unit
        return unit.rsplit(".", 1)[0]

    def check_ranks(self) -> None:
        """Compare a fingerprint of every mask and of the step count across ranks; raise on every rank
        if any differ.

        Only what must be identical is compared: the masks of the dense layers (and of stacks that are not
        expert-parallel) and the step count across all ranks of ``process_group``; the masks of an
        expert-parallel stack only between the ranks that hold the same experts (``expert_group``). With
        one rank per expert (no ``expert_group``) those masks have no replica to compare with, and are not
        checked across ranks.

        Raises:
            MaskDivergenceError: (a :class:`~sparsetrain.contract.RankDivergenceError`) naming the
                layers whose masks differ.
        """
        if self._world() == 1:
            return
        masks = self._checked_masks()
        # The masks' fingerprints are computed again only when a mask was written since (every in-place
        # write bumps a tensor's version counter); the comparison across ranks runs every time.
        key = tuple((id(m), m._version) for m in masks.values())
        if self._fingerprints is None or self._fingerprints[0] != key:
            device = next(iter(masks.values())).device if masks else None
            self._fingerprints = (key, {name: contract.fingerprint(m).to(device) for name, m in masks.items()})
        prints = {k: v for k, v in self._fingerprints[1].items() if k not in self._sharded}
        experts = {k: v for k, v in self._fingerprints[1].items() if k in self._sharded}
        device = next(iter(self._fingerprints[1].values())).device if self._fingerprints[1] else None
        prints["step"] = torch.tensor([self._step, self._updates], dtype=torch.int64, device=device)
        try:
            contract.check_in_sync(prints, self.process_group, what=f"sparsity masks after step {self._step}")
            if experts and self.expert_group is not None:
                contract.check_in_sync(experts, self.expert_group,
                                       what=f"expert sparsity masks after step {self._step}")
        except contract.RankDivergenceError as err:
            raise MaskDivergenceError(str(err)) from None

    def _checked_masks(self) -> dict[str, torch.Tensor]:
        """The masks :meth:`check_ranks` compares across ranks."""
        return self.masks()

    def check_masks_in_sync(self) -> None:
        """Deprecated alias of :meth:`check_ranks`."""
        self.check_ranks()

    # ------------------------------------------------------------------ statistics and state

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Current sparsity figures, flat and namespaced (the keys the Lightning callback logs).

        Returns:
            Plain floats: ``sparsity/global`` (over the sparsified layers), ``sparsity/target`` (the
            schedule's target at the latest update, or at the start), ``sparsity/active`` and
            ``sparsity/total`` (weight counts), ``sparsity/itop_rate`` (in-time over-parameterisation:
            fraction of the sparsified weights ever active, Liu et al. 2021), ``sparsity/updates``
            (mask updates so far), ``sparsity/regrown`` (connections grown by the latest update that
            were inactive before it, 0 before any), ``sparsity/regrown_total``,
            ``sparsity/drop_fraction`` (of the latest update), ``sparsity/step`` (optimizer steps
            seen) and ``sparsity/layer/<module name>`` per layer.

            Per rank where a stack is expert-parallel: the counts (``global``, ``active``, ``total``,
            ``itop_rate``, ``regrown``, the stack's ``layer`` entry) cover the experts this rank holds and
            every dense layer, with no communication here; sum ``active`` / ``total`` over the
            expert-parallel group for the figures of the whole model.
        """
        layer, active, total, ever = {}, 0, 0, 0
        for name in self._modules:
            n = self._mask(name).numel()
            a = self._active[name]
            layer[f"sparsity/layer/{name}"] = 1.0 - a / n
            active += a
            total += n
            ever += self._ever_counts[name]
        last = self._last_update
        target = last["target"]
        if target is None:
            target = self.schedule.sparsity_at(0) if self.schedule is not None else self.config.sparsity
        return {
            "sparsity/global": 1.0 - active / total if total else 0.0,
            "sparsity/target": float(target),
            "sparsity/active": float(active),
            "sparsity/total": float(total),
            "sparsity/itop_rate": ever / total if total else 0.0,
            "sparsity/updates": float(self._updates),
            "sparsity/regrown": float(last["regrown"]),
            "sparsity/regrown_total": float(self._regrown_total),
            "sparsity/drop_fraction": float(last["drop_fraction"]),
            "sparsity/step": float(self._step),
            **layer,
        }

    @property
    def update_count(self) -> int:
        """Mask updates so far."""
        return self._updates

    def _config_dict(self) -> dict[str, Any]:
        """The config as plain Python (``module_types`` as class names)."""
        out = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "module_types"}
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        out["module_types"] = [f"{t.__module__}.{t.__qualname__}" for t in self.config.module_types]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain state (ints, strings, tensors) for checkpoints; the masks themselves are model buffers.

        Version 2: with the ``config`` (see :meth:`load_state_dict`) and the latest update's figures.
        Expert stacks are held whole, by global expert id (index e of dim 0 is expert e, as
        ``sparsetrain.moe.globalize_optimizer_state`` holds optimizer state): ``ever_active[<stack>]`` and
        ``stack_masks[<stack>]`` are ``[E, ...]``, all-gathered over the layer's expert-parallel group where
        the stack is expert-parallel (then every rank of the group must call this), so the state loads at
        any expert-parallel size.
        """
        return {
            "version": _STATE_VERSION,
            "config": self._config_dict(),
            "method": self.config.method,
            "step": self._step,
            "updates": self._updates,
            "regrown_total": self._regrown_total,
            "last_update": dict(self._last_update),
            "layers": list(self._modules),
            "rng_state": self._generator.get_state(),
            "ever_active": {name: self._full(name, t).clone() for name, t in self._ever_active.items()},
            "stack_masks": {name: self._full(name, self._mask(name)).clone() for name in self._stacked},
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (load the model's state dict too, for the masks).

        Loads versions 1 (without a config) and 2. The saved schedule replaces the current one, so
        a resumed run keeps the original run length. The masks of expert stacks come from the state's
        ``stack_masks`` where it has them (this rank's experts of the whole stacks, whatever the
        expert-parallel size that saved them), else from the model.

        Raises:
            ValueError: an unknown state version, a saved config differing from this one in a field
                that changes the math (:data:`MATH_FIELDS`, for Top-KAST also ``backward_extra`` and
                ``exploration_penalty``; named in the message), a different method
                or layer set, a missing or malformed entry (named), or a model mask that this
                sparsifier could not hold (:meth:`check_mask`). Nothing is changed then.
        """
        if not isinstance(state, dict):
            raise ValueError(f"`state` must be a dict from DynamicSparsifier.state_dict(), got {type(state).__name__}")
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"`state` version must be 1 or {_STATE_VERSION}, got {version!r}")
        missing = [k for k in ("method", "step", "layers", "rng_state", "ever_active") if k not in state]
        if missing:
            raise ValueError(f"`state` is truncated: it has no {', '.join(repr(k) for k in missing)} "
                             "(not a complete DynamicSparsifier.state_dict())")
        contract.check_config(state.get("config"), self.config, self._math_fields, "DynamicSparsifier")
        if state["method"] != self.config.method:
            raise ValueError(f"`state` is for method {state['method']!r}, this sparsifier runs {self.config.method!r}")
        if not isinstance(state["layers"], (list, tuple)) or list(state["layers"]) != list(self._modules):
            raise ValueError(
                f"`state` covers layers {state['layers']!r}, this sparsifier covers {list(self._modules)}"
            )
        for key in ("step", "updates", "regrown_total"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`state[{key!r}]` must be an int >= 0, got {value!r}")
        rng = state["rng_state"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
            raise ValueError(f"`state['rng_state']` must be a uint8 tensor (a torch.Generator state), got "
                             f"{type(rng).__name__ if not isinstance(rng, torch.Tensor) else rng.dtype}")
        ever = state["ever_active"]
        if not isinstance(ever, dict) or set(ever) != set(self._modules):
            raise ValueError(f"`state['ever_active']` must map every sparsified layer ({list(self._modules)}) to a "
                             f"mask, got {sorted(ever) if isinstance(ever, dict) else type(ever).__name__}")
        stack_masks = state.get("stack_masks")
        if stack_masks is not None and (not isinstance(stack_masks, dict) or set(stack_masks) != set(self._stacked)):
            got = sorted(stack_masks) if isinstance(stack_masks, dict) else type(stack_masks).__name__
            raise ValueError(f"`state['stack_masks']` must map every sparsified expert stack ({list(self._stacked)}) "
                             f"to its mask, got {got}")
        for key, entries in (("ever_active", ever), ("stack_masks", stack_masks or {})):
            for name, t in entries.items():
                shape = self._global_shapes[name]
                if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or tuple(t.shape) != shape:
                    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"`state[{key!r}][{name!r}]` must be a bool tensor of shape {shape}, got {got}")
        schedule = state.get("schedule")
        if schedule is not None:
            try:
                schedule = MaskSchedule(**schedule)
            except (TypeError, ValueError) as err:
                raise ValueError(f"`state['schedule']` is not a valid schedule: {err}") from None
            if schedule.method != self.config.method:
                raise ValueError(f"`state['schedule']` is for method {schedule.method!r}, this sparsifier runs "
                                 f"{self.config.method!r}")
        for name in self._modules:  # the model's masks (loaded before this state), or the state's stack masks
            if stack_masks is not None and name in stack_masks:
                self.check_mask(name, self._local(name, stack_masks[name]),
                                what=f"`state['stack_masks'][{name!r}]` (this rank's experts)")
            else:
                self.check_mask(name, self._mask(name))
        self._step = int(state["step"])
        self._updates = int(state.get("updates", 0))
        self._regrown_total = int(state.get("regrown_total", 0))
        last = state.get("last_update")
        self._last_update = (dict(last) if last is not None
                             else {"regrown": 0, "drop_fraction": 0.0, "target": None})
        self._generator.set_state(state["rng_state"].clone())
        for name, t in (stack_masks or {}).items():
            self._mask(name).copy_(self._local(name, t))
        for name, t in state["ever_active"].items():
            self._ever_active[name] = self._local(name, t).to(self._mask(name).device).clone()
        self._recount(ever=True)
        if schedule is not None:
            self.set_schedule(schedule)
        elif self.schedule is not None:
            self._capture = self.schedule.needs_gradient(self._step + 1)
        self._dense_grads.clear()
        self.mask_version += 1
        self.apply_masks()
