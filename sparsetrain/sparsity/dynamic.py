"""Dynamic sparse training from a plain loop: masks, enforcement, schedule and updates.

:class:`DynamicSparsifier` owns the stateful side; the algorithms are the pure functions of
:mod:`.rigl`, :mod:`.set`, :mod:`.gmp` and :mod:`.density`. Usage::

    sparsifier = DynamicSparsifier(model, DynamicSparsityConfig(method="rigl", sparsity=0.9),
                                   total_steps=10_000, optimizer=optimizer)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()          # the sparsifier's step-post hook enforces masks / updates them
        optimizer.zero_grad()

How the invariants are kept (each is tested):

- Every sparsified module gets a persistent ``torch.bool`` buffer ``weight_mask`` beside its
  ``weight``; ``model.state_dict()`` carries it and ``model.load_state_dict()`` restores it
  (a load post-hook then re-masks the weights). The parameter keeps its name and shape, so
  checkpoints stay loadable by code that knows nothing of the masks.
- The stored weights are exactly zero outside the mask at every point the model can be run:
  after construction, after every optimizer step, after every mask update and after every
  ``load_state_dict``. So the forward always sees ``torch.where(mask, W, 0)``, at no cost to
  the forward itself.
- A tensor hook on each sparsified weight turns its gradient into ``torch.where(mask, g, 0)``
  before it is accumulated (and before DDP reduces it), so gradient clipping and the optimizer
  see the gradient of the masked model. On steps whose update needs it (RigL), the same hook
  first adds the unmasked gradient -- the dense gradient of the masked forward -- to a side
  buffer, summing over gradient-accumulation micro-batches; it is all-reduced across ranks
  before the update. Masking is NaN-safe (a NaN or inf outside the mask becomes 0), never
  ``x * mask``: ``torch.where`` on accelerators; on CPU, where torch's bool-select kernel is not
  vectorised (about 10x slower than a multiply), the same result bit for bit from an AND of the
  float's bits with a cached integer mask of all-ones / all-zeros.
- After every optimizer step (a ``register_step_post_hook`` hook, or an explicit
  :meth:`DynamicSparsifier.step` call) the weights and every optimizer state tensor of the
  weight's shape (SGD momentum, Adam ``exp_avg`` / ``exp_avg_sq``, ...) are zeroed outside the
  mask, so momentum and weight decay cannot revive pruned weights. Mask updates happen at the
  same point, counted in optimizer steps, so gradient accumulation is respected.
- Under ``torch.distributed`` every rank takes the same decisions: growth by the all-reduced
  dense gradient, random choices from a generator seeded alike on every rank (its state is
  checkpointed), and after each update a checksum of all masks is compared across ranks;
  a mismatch raises :class:`MaskDivergenceError`. The masks are excluded from DDP's buffer
  broadcast (so a divergence cannot be papered over by rank 0's copy, and the masks do not
  travel every step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .density import DISTRIBUTIONS, layer_active_counts
from .gmp import magnitude_prune
from .masks import DEFAULT_MODULE_TYPES, random_mask, select_modules
from .rigl import rigl_update
from .schedules import DROP_SCHEDULES, METHODS, MaskSchedule
from .set import set_update

__all__ = [
    "MASK_NAME",
    "DynamicSparsifier",
    "DynamicSparsityConfig",
    "MaskDivergenceError",
]

MASK_NAME = "weight_mask"
_STATE_VERSION = 1
# Integer views used for NaN-safe bitwise masking on CPU (same element size as the float type).
_BIT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


class MaskDivergenceError(RuntimeError):
    """Masks differ across ranks (raised on every rank by the cross-rank checksum)."""


@dataclass(kw_only=True)
class DynamicSparsityConfig:
    """What to sparsify and how (everything but the run length).

    Args:
        method: ``"rigl"`` (Evci et al. 2020), ``"set"`` (Mocanu et al. 2018), ``"gmp"``
            (dense-to-sparse, Zhu & Gupta 2017) or ``"static"`` (random mask at init, fixed).
        sparsity: final fraction of zero weights over the sparsified layers, in [0, 1).
        distribution: how the sparsity is spread over layers: ``"erk"``, ``"er"`` or ``"uniform"``
            (see :func:`sparsetrain.sparsity.layer_densities`).
        update_interval: optimizer steps between mask updates (``dT``), >= 1.
        drop_fraction: RigL/SET fraction of active weights replaced at the first update (``alpha``).
        drop_schedule: ``"cosine"`` decay of the drop fraction to 0 at ``end_fraction`` (paper)
            or ``"constant"``.
        begin_fraction: fraction of training before the first update (gmp: where pruning starts).
        end_fraction: fraction of training after which masks are frozen (gmp: where the final
            sparsity is reached), in (0, 1].
        include: module-name globs to sparsify (default: every Linear / Conv1d/2d/3d).
        exclude: module-name globs to leave dense.
        keep_first_dense: leave the first selected module dense.
        keep_last_dense: leave the last selected module dense.
        module_types: module classes that can be sparsified.
        seed: seed of the generator drawing random masks and SET growth (same on every rank).
        check_sync: compare a checksum of the masks across ranks after every update.
        enforce_interval: zero weights and optimizer states outside the masks every this many
            optimizer steps (always also after each mask update, at attach and after loading).
            1 (default) enforces after every step. Larger values save that memory pass; they stay
            exact for elementwise optimizers that map (zero gradient, zero state, zero weight) to
            zero -- SGD with momentum / weight decay, Adam, AdamW, RMSprop, Adagrad, Lion -- because
            the gradient is masked before the optimizer sees it; not for optimizers that mix
            coordinates (Shampoo, Muon).
    """

    method: str = "rigl"
    sparsity: float = 0.8
    distribution: str = "erk"
    update_interval: int = 100
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"
    begin_fraction: float = 0.0
    end_fraction: float = 0.75
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    module_types: tuple[type[nn.Module], ...] = field(default=DEFAULT_MODULE_TYPES)
    seed: int = 0
    check_sync: bool = True
    enforce_interval: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int) \
                or self.update_interval < 1:
            raise ValueError(f"`update_interval` must be an int >= 1, got {self.update_interval!r}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"`drop_fraction` must be in [0, 1], got {self.drop_fraction!r}")
        if self.drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"`drop_schedule` must be one of {', '.join(DROP_SCHEDULES)}, got {self.drop_schedule!r}"
            )
        if not 0.0 < self.end_fraction <= 1.0:
            raise ValueError(f"`end_fraction` must be in (0, 1], got {self.end_fraction!r}")
        if not 0.0 <= self.begin_fraction < self.end_fraction:
            raise ValueError(
                f"`begin_fraction` must be in [0, end_fraction={self.end_fraction}), got {self.begin_fraction!r}"
            )
        for arg in ("include", "exclude"):
            value = getattr(self, arg)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"`{arg}` must be a list of glob strings, got {value!r}")
            setattr(self, arg, tuple(value))
        if not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")
        if isinstance(self.enforce_interval, bool) or not isinstance(self.enforce_interval, int) \
                or self.enforce_interval < 1:
            raise ValueError(f"`enforce_interval` must be an int >= 1, got {self.enforce_interval!r}")

    def schedule(self, total_steps: int) -> MaskSchedule:
        """The schedule of a run of ``total_steps`` optimizer steps."""
        return MaskSchedule.from_fractions(
            method=self.method, sparsity=float(self.sparsity), total_steps=total_steps,
            update_interval=self.update_interval, begin_fraction=self.begin_fraction,
            end_fraction=self.end_fraction, drop_fraction=self.drop_fraction, drop_schedule=self.drop_schedule,
        )


def _checksum(mask: torch.Tensor) -> torch.Tensor:
    """Two int64 numbers identifying a mask: its count and a hash of its active positions."""
    flat = mask.flatten()
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    h = (pos * 2654435761 + 97) % 2147483629
    return torch.stack([flat.sum(dtype=torch.int64), torch.where(flat, h, 0).sum()])


class DynamicSparsifier:
    """Masks, enforces and updates the sparsity of a model's weights during training.

    Args:
        model: the model (not yet wrapped in DDP, so that the masks can be excluded from
            DDP's buffer broadcast; wrapping it afterwards is fine).
        config: what to sparsify and how.
        total_steps: optimizer steps in the whole run; may be given later with
            :meth:`set_total_steps` (the Lightning callback does), but before the first step.
        optimizer: optional optimizer to attach at once (see :meth:`attach_optimizer`).
        hook_optimizer: with ``optimizer``, register a step-post hook that calls :meth:`step`;
            ``False`` means the loop calls :meth:`step` right after ``optimizer.step()``.
        process_group: group for the cross-rank reductions (default: the default group when
            ``torch.distributed`` is initialised with more than one rank).

    Raises:
        ValueError: a filter matching no module, a module that already has a ``weight_mask``.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sp = DynamicSparsifier(model, DynamicSparsityConfig(method="set", sparsity=0.5, update_interval=2),
        ...                        total_steps=10, optimizer=opt)
        >>> sorted(k for k in model.state_dict() if k.endswith("_mask"))
        ['0.weight_mask', '2.weight_mask']
        >>> round(sp.statistics()["sparsity"], 3)
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        config: DynamicSparsityConfig,
        *,
        total_steps: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        hook_optimizer: bool = True,
        process_group: Any = None,
    ) -> None:
        if not isinstance(config, DynamicSparsityConfig):
            raise TypeError(f"`config` must be a DynamicSparsityConfig, got {type(config).__name__}")
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
        self._step_hook_optimizer: torch.optim.Optimizer | None = None
        self._step_hook_handle: Any = None
        self._generator = torch.Generator().manual_seed(config.seed)
        self._step = 0
        self._capture = False
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._bit_masks: dict[tuple[str, torch.dtype], tuple[tuple[int, int, int], torch.Tensor]] = {}
        # statistics
        self._ever_active: dict[str, torch.Tensor] = {}
        self._updates = 0
        self._regrown_total = 0
        self.last_statistics: dict[str, Any] | None = None

        names = select_modules(
            model, include=config.include, exclude=config.exclude, module_types=config.module_types,
            keep_first_dense=config.keep_first_dense, keep_last_dense=config.keep_last_dense,
        )
        named = dict(model.named_modules())
        for name in names:
            module = named[name]
            if MASK_NAME in module._buffers or hasattr(module, MASK_NAME):
                raise ValueError(f"module {name!r} already has a `{MASK_NAME}` (sparsified twice, or pruned?)")
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(
                    f"module {name!r} has a parametrized `weight` (another sparsifier?): exclude it with `exclude`"
                )
            self._modules[name] = module
        self._shapes = {name: tuple(m.weight.shape) for name, m in self._modules.items()}
        if config.method == "gmp" or config.sparsity == 0.0:
            counts = {name: math.prod(s) for name, s in self._shapes.items()}
        else:
            counts = layer_active_counts(self._shapes, float(config.sparsity), config.distribution)
        for name, module in self._modules.items():
            w = module.weight
            mask = random_mask(w.shape, counts[name], self._generator, w.device)
            module.register_buffer(MASK_NAME, mask, persistent=True)
            self._ever_active[name] = mask.clone()
            if w.requires_grad:
                self._handles.append(w.register_hook(self._make_grad_hook(name)))
        self._handles.append(model.register_load_state_dict_post_hook(self._after_load))
        self._exclude_masks_from_ddp()
        if total_steps is not None:
            self.set_total_steps(total_steps)
        if optimizer is not None:
            self.attach_optimizer(optimizer, hook=hook_optimizer)
        self.apply_masks()

    # ------------------------------------------------------------------ wiring

    def _exclude_masks_from_ddp(self) -> None:
        prefix = {m: n for n, m in self.model.named_modules()}
        names = [f"{prefix[m]}.{MASK_NAME}" if prefix[m] else MASK_NAME for m in self._modules.values()]
        existing = list(getattr(self.model, "_ddp_params_and_buffers_to_ignore", []))
        self.model._ddp_params_and_buffers_to_ignore = existing + [n for n in names if n not in existing]
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            warnings.warn(
                "DynamicSparsifier was given a DDP-wrapped model: DDP will broadcast the masks from rank 0 "
                "every forward. Attach the sparsifier to the module before wrapping it.",
                stacklevel=3,
            )

    def _make_grad_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        module = self._modules[name]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._capture:
                buf = self._dense_grads.get(name)
                if buf is None:
                    self._dense_grads[name] = grad.detach().clone()
                else:
                    buf.add_(grad.detach())
            return self._masked(grad, module._buffers[MASK_NAME], name)

        return hook

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.apply_masks()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> None:
        """Mask this optimizer's same-shape states after every step; optionally drive :meth:`step`.

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
        if not any(id(m.weight) in held for m in self._modules.values()):
            raise ValueError("`optimizer` holds none of the sparsified weights")
        if hook and self._step_hook_optimizer is not None:
            raise ValueError("`hook=True` for a second optimizer: only one optimizer may drive the mask steps")
        if all(optimizer is not o for o in self._optimizers):
            self._optimizers.append(optimizer)
        if hook:
            self._step_hook_optimizer = optimizer
            self._step_hook_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        self.apply_masks()

    def detach_optimizers(self) -> None:
        """Forget every attached optimizer and remove the step hook (e.g. before attaching a new one)."""
        if self._step_hook_handle is not None:
            self._step_hook_handle.remove()
        self._step_hook_handle = None
        self._step_hook_optimizer = None
        self._optimizers.clear()

    def add_state_masker(self, masker: Callable[[list[tuple[nn.Parameter, torch.Tensor]]], None]) -> None:
        """Register ``masker(pairs)``, called with ``[(weight, mask), ...]`` whenever masks are enforced.

        For state the sparsifier cannot see: e.g. the fp32 master weights of a DeepSpeed ZeRO
        optimizer (:mod:`sparsetrain.sparsity.deepspeed`).
        """
        self._state_maskers.append(masker)
        masker(self._pairs())

    def remove(self) -> None:
        """Remove every hook; the masks stay in the model as buffers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.detach_optimizers()
        self._capture = False
        self._dense_grads.clear()

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length (and hence the schedule); must happen before the first :meth:`step`."""
        self.set_schedule(self.config.schedule(int(total_steps)))

    def set_schedule(self, schedule: MaskSchedule) -> None:
        """Use an explicit schedule (e.g. the one restored from a checkpoint)."""
        if not isinstance(schedule, MaskSchedule):
            raise TypeError(f"`schedule` must be a MaskSchedule, got {type(schedule).__name__}")
        if schedule.method != self.config.method:
            raise ValueError(f"`schedule.method` is {schedule.method!r} but the config says {self.config.method!r}")
        self.schedule = schedule
        if schedule.method in ("rigl", "set", "gmp") and not schedule.update_steps():
            warnings.warn(
                f"no mask update fits in {schedule.total_steps} steps (update_interval={schedule.update_interval}, "
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

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Module name -> its current mask buffer (live tensors; do not modify)."""
        return {name: m._buffers[MASK_NAME] for name, m in self._modules.items()}

    def _pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(m.weight, m._buffers[MASK_NAME]) for m in self._modules.values()]

    def _iter_state_tensors(self, weight: nn.Parameter) -> Iterator[torch.Tensor]:
        for opt in self._optimizers:
            state = opt.state.get(weight)
            if not state:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    yield value

    # ------------------------------------------------------------------ enforcement

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A cached 0-dim zero of ``like``'s dtype and device (no allocation or fill kernel per call)."""
        key = (like.dtype, like.device)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return z

    def _bits(self, name: str, mask: torch.Tensor, int_dtype: torch.dtype) -> torch.Tensor:
        """The mask as integers with every bit set (kept) or clear (masked), cached until the mask changes."""
        key = (name, int_dtype)
        signature = (id(mask), mask.data_ptr(), mask._version)
        entry = self._bit_masks.get(key)
        if entry is None or entry[0] != signature:
            entry = self._bit_masks[key] = (signature, mask.to(int_dtype).neg_())
        return entry[1]

    def _masked(self, t: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
        """``torch.where(mask, t, 0)`` as a new tensor."""
        int_dtype = _BIT_VIEW.get(t.dtype) if t.device.type == "cpu" else None
        if int_dtype is None:
            return torch.where(mask, t, self._zero(t))
        return torch.bitwise_and(t.view(int_dtype), self._bits(name, mask, int_dtype)).view(t.dtype)

    def _mask_(self, t: torch.Tensor, mask: torch.Tensor, name: str) -> None:
        """``t = torch.where(mask, t, 0)`` in place."""
        int_dtype = _BIT_VIEW.get(t.dtype) if t.device.type == "cpu" else None
        if int_dtype is None:
            torch.where(mask, t, self._zero(t), out=t)
        else:
            t.view(int_dtype).bitwise_and_(self._bits(name, mask, int_dtype))

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every sparsified weight and its same-shape optimizer states outside the mask."""
        for name, module in self._modules.items():
            weight, mask = module.weight, module._buffers[MASK_NAME]
            self._mask_(weight, mask, name)
            for state in self._iter_state_tensors(weight):
                self._mask_(state, mask, name)
        if self._state_maskers:
            pairs = self._pairs()
            for masker in self._state_maskers:
                masker(pairs)
        for masker in self._state_maskers:
            masker(pairs)

    def step(self) -> dict[str, Any] | None:
        """Account for one optimizer step: enforce masks, and update them if the schedule says so.

        Call right after ``optimizer.step()`` (the hook installed by :meth:`attach_optimizer` does).

        Returns:
            The statistics of the mask update made at this step (see :meth:`statistics`), or
            ``None`` when the masks did not change.

        Raises:
            RuntimeError: no schedule yet (:meth:`set_total_steps` was not called).
            MaskDivergenceError: with ``check_sync``, the masks differ across ranks after an update.
        """
        if self.schedule is None:
            raise RuntimeError("DynamicSparsifier.step() before the run length is known: call set_total_steps()")
        self._step += 1
        t = self._step
        stats = None
        if self.schedule.is_update_step(t):
            stats = self._update(t)
        elif t % self.config.enforce_interval == 0:
            self.apply_masks()
        self._capture = self.schedule.needs_gradient(t + 1)
        return stats

    # ------------------------------------------------------------------ updates

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    @torch.no_grad()
    def _reduced_dense_grads(self) -> dict[str, torch.Tensor]:
        grads = {}
        for name, module in self._modules.items():
            g = self._dense_grads.pop(name, None)
            if g is None:  # the layer took no part in this step's backward
                g = torch.zeros_like(module.weight)
            grads[name] = g
        self._dense_grads.clear()
        world = self._world()
        if world > 1:
            works = [dist.all_reduce(g, group=self.process_group, async_op=True) for g in grads.values()]
            for w in works:
                w.wait()
            for g in grads.values():
                g.div_(world)
        return grads

    @torch.no_grad()
    def _update(self, t: int) -> dict[str, Any]:
        cfg, sched = self.config, self.schedule
        assert sched is not None
        grads = self._reduced_dense_grads() if cfg.method == "rigl" else {}
        drop = sched.drop_fraction_at(t) if cfg.method in ("rigl", "set") else 0.0
        if cfg.method == "gmp":
            target = sched.sparsity_at(t)
            if target == 0.0:
                keep = {name: math.prod(s) for name, s in self._shapes.items()}
            else:
                keep = layer_active_counts(self._shapes, target, cfg.distribution)
        regrown = 0
        for name, module in self._modules.items():
            weight, mask = module.weight, module._buffers[MASK_NAME]
            if cfg.method == "rigl":
                new = rigl_update(weight, grads[name], mask, math.floor(drop * int(mask.sum())))
            elif cfg.method == "set":
                new = set_update(weight, mask, math.floor(drop * int(mask.sum())), self._generator)
            else:
                new = magnitude_prune(weight, mask, keep[name])
            regrown += int((new & ~mask).sum())
            mask.copy_(new)
            ever = self._ever_active[name]
            if ever.device != mask.device:
                ever = self._ever_active[name] = ever.to(mask.device)
            ever |= mask
        # Newly grown connections were inactive, so their weights and optimizer states are already 0.
        self.apply_masks()
        self._updates += 1
        self._regrown_total += regrown
        if cfg.check_sync:
            self.check_masks_in_sync()
        stats = self.statistics()
        stats.update(step=t, regrown=regrown, drop_fraction=float(drop), target_sparsity=sched.sparsity_at(t))
        self.last_statistics = stats
        return stats

    def check_masks_in_sync(self) -> None:
        """Compare a checksum of every mask across ranks; raise on every rank if any differ.

        Raises:
            MaskDivergenceError: naming the layers whose masks differ.
        """
        if self._world() == 1:
            return
        masks = self.masks
        local = torch.cat([_checksum(m) for m in masks.values()])
        lo, hi = local.clone(), local.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.process_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.process_group)
        differ = (lo != hi).view(-1, 2).any(dim=1).tolist()
        if any(differ):
            bad = [name for name, d in zip(masks, differ) if d]
            raise MaskDivergenceError(
                f"sparsity masks differ across ranks after step {self._step} in {len(bad)} layer(s): "
                f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}"
            )

    # ------------------------------------------------------------------ statistics and state

    @torch.no_grad()
    def statistics(self) -> dict[str, Any]:
        """Current sparsity figures.

        Returns:
            ``sparsity`` (global, over the sparsified layers), ``layer_sparsity`` (name -> sparsity),
            ``active`` and ``total`` weight counts, ``itop_rate`` (in-time over-parameterisation:
            fraction of the sparsified weights that have ever been active, Liu et al. 2021) and
            ``step``, ``updates`` (mask updates so far) and ``regrown_total`` (connections grown so
            far). :meth:`step` adds ``regrown`` (connections that were inactive before this update),
            ``drop_fraction`` and ``target_sparsity`` for an update.
        """
        layer, active, total, ever = {}, 0, 0, 0
        for name, mask in self.masks.items():
            n = mask.numel()
            a = int(mask.sum())
            layer[name] = 1.0 - a / n
            active += a
            total += n
            ever += int(self._ever_active[name].sum())
        return {
            "step": self._step,
            "sparsity": 1.0 - active / total,
            "layer_sparsity": layer,
            "active": active,
            "total": total,
            "itop_rate": ever / total,
            "updates": self._updates,
            "regrown_total": self._regrown_total,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain state (ints, strings, tensors) for checkpoints; the masks themselves are model buffers."""
        return {
            "version": _STATE_VERSION,
            "method": self.config.method,
            "step": self._step,
            "updates": self._updates,
            "regrown_total": self._regrown_total,
            "layers": list(self._modules),
            "rng_state": self._generator.get_state(),
            "ever_active": {name: t.clone() for name, t in self._ever_active.items()},
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (load the model's state dict too, for the masks).

        The saved schedule replaces the current one, so a resumed run keeps the original run length.

        Raises:
            ValueError: a different method, layer set or state version.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"`state` version must be {_STATE_VERSION}, got {state.get('version')!r}")
        if state["method"] != self.config.method:
            raise ValueError(f"`state` is for method {state['method']!r}, this sparsifier runs {self.config.method!r}")
        if list(state["layers"]) != list(self._modules):
            raise ValueError(
                f"`state` covers layers {list(state['layers'])}, this sparsifier covers {list(self._modules)}"
            )
        self._step = int(state["step"])
        self._updates = int(state.get("updates", 0))
        self._regrown_total = int(state.get("regrown_total", 0))
        self._generator.set_state(state["rng_state"].clone())
        for name, t in state["ever_active"].items():
            self._ever_active[name] = t.to(self._modules[name]._buffers[MASK_NAME].device).clone()
        if state.get("schedule") is not None:
            self.set_schedule(MaskSchedule(**state["schedule"]))
        elif self.schedule is not None:
            self._capture = self.schedule.needs_gradient(self._step + 1)
        self._dense_grads.clear()
        self.apply_masks()
