"""Deep Gradient Compression as a DDP communication hook: ``DGCState`` and ``dgc_hook``.

:class:`DGCState` is the component (``docs/architecture.md``): it names the parameters, owns a
:class:`~sparsetrain.compression.engine.CompressionEngine` (the algorithm and this rank's
residuals and momenta), and offers the lifecycle every component has (``step()``,
``statistics()``, ``masks()``, versioned ``state_dict()``, ``check_ranks()``, ``remove()``).
:func:`dgc_hook` drives the engine from DDP: each bucket is compressed, exchanged with one
all-gather (sparse) or all-reduce (dense), and decompressed into the averaged gradient.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .. import _gloo, _warn, contract
from .engine import CompressionEngine
from .plan import DENSITY_RAMP, MATH_FIELDS, BucketLayout, DGCConfig

__all__ = [
    "DENSITY_RAMP",
    "DGCConfig",
    "DGCState",
    "check_optimizer",
    "dgc_hook",
]

_STATE_VERSION = 2
_LOADABLE = (1, 2)
_LAST = ("density", "sent_fraction", "payload_bytes", "dense_payload_bytes", "wire_bytes", "dense_wire_bytes",
         "compress_s", "sparse_buckets", "dense_buckets")
_TOTALS = ("payload_bytes", "dense_payload_bytes", "wire_bytes", "dense_wire_bytes", "compress_s")  # engine's totals


class _StepCount(int):
    """What ``DGCState.step`` reads as: the synced step count (deprecated, use ``step_count``),
    and, when called, :meth:`DGCState.step`."""

    def __new__(cls, value: int, step: Any) -> _StepCount:
        obj = super().__new__(cls, value)
        obj._step = step
        return obj

    def __call__(self) -> None:
        return self._step()


def _deprecated_number(name: str) -> Any:
    op = getattr(int, name)

    def wrapper(self: _StepCount, *args: Any) -> Any:
        _warn.warn(
            "`DGCState.step` as a number is deprecated: read `step_count` (`step()` is now the method every "
            "component has: account for one optimizer step)",
            FutureWarning,
            stacklevel=2,
        )
        return op(self, *args)

    return wrapper


for _name in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__int__", "__index__", "__float__",
              "__add__", "__radd__", "__sub__", "__rsub__", "__mod__", "__floordiv__", "__str__", "__format__"):
    setattr(_StepCount, _name, _deprecated_number(_name))
_StepCount.__hash__ = int.__hash__


class DGCState:
    """Gradient compression (DGC) as a component: the state of :func:`dgc_hook`.

    Example::

        >>> # xdoctest: +SKIP("needs an initialised process group")
        >>> state = DGCState(model, density=0.001, momentum=0.9)
        >>> ddp = DistributedDataParallel(model)
        >>> state.register(ddp)                      # or ddp.register_comm_hook(state, dgc_hook)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)   # no momentum: the hook owns it
        >>> check_optimizer(state, opt)

    or through Lightning's ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=dgc_hook)`` on CUDA
    (Lightning ignores comm hooks on CPU; use :class:`sparsetrain.callbacks.GradientCompression`).

    The state is keyed by parameter name when a model is bound (``model``, :meth:`register` or
    :meth:`bind`), else by order of first appearance in DDP's first synced iteration (the same on
    every rank and every restart of the same model). With a bound model, the residuals and
    momenta are cleared outside the gradient masks of the components attached to it whenever
    those change (rule 3 of ``docs/architecture.md``): no gradient reaches a pruned weight.

    Args:
        model: the model (unwrapped or DDP) whose parameter names key the state; the state is
            attached to it (``contract.attach``; it claims no weight).
        config: a :class:`DGCConfig`; or give its fields as keyword arguments instead.
        optimizer: checked with :func:`check_optimizer`; its step hook then calls :meth:`step`.
        process_group: the group the hook communicates over; None for the default group.
        grad_scaler: a ``torch.amp.GradScaler`` whose loss scale the gradients carry; the
            residuals and momenta are rescaled whenever the scale changes, and the clip
            threshold follows it.
        module: deprecated alias of ``model``.
        **config_fields: :class:`DGCConfig` fields.

    The previous order ``DGCState(process_group, config)`` still works, with a ``FutureWarning``.

    Attributes:
        engine: the :class:`~sparsetrain.compression.engine.CompressionEngine` the hook drives.
        step_count: synced steps taken (the hook counts at DDP's last bucket).
        residuals: parameter name -> this rank's unsent accumulated gradient (flat, float32).
        momenta: parameter name -> this rank's momentum ``u`` (flat, float32).
        last_stats: statistics of the last step; ``totals``: their sums (see :meth:`statistics`).

    The tensors in ``residuals`` and ``momenta`` are replaced every step, and their memory is
    reused for later steps: clone them (or use :meth:`state_dict`) to keep a copy.

    Raises:
        ValueError: a bad option, or both ``config`` and keyword options.
        TypeError: ``model`` is not a module.
    """

    #: Compression never masks gradients: it has no masks (:meth:`masks` is empty).
    masks_gradients = False

    __slots__ = (
        "process_group",
        "engine",
        # internal state
        "_names",
        "_bound",
        "_model",
        "_sizes",
        "_layouts",
        "_optimizer_steps",
        "_handles",
        "_removed",
        "__weakref__",
    )

    def __init__(
        self,
        model: nn.Module | None = None,
        config: DGCConfig | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        process_group: dist.ProcessGroup | None = None,
        grad_scaler: Any = None,
        module: nn.Module | None = None,
        **config_fields: Any,
    ) -> None:
        if dist.is_available() and isinstance(model, dist.ProcessGroup):
            if process_group is not None:
                raise ValueError("a process group was given both as the first argument and as `process_group`")
            _warn.warn(
                "DGCState(process_group, config) is deprecated: the first argument is now the model; "
                "pass DGCState(model, config, process_group=...)",
                FutureWarning,
                stacklevel=2,
            )
            model, process_group = None, model
        if module is not None:
            _warn.warn("`module` is deprecated: pass the model as `model` (the first argument)", FutureWarning,
                          stacklevel=2)
            if model is not None:
                raise ValueError("give the model as `model` or as `module` (deprecated), not both")
            model = module
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module or None, got {type(model).__name__}")
        if config is not None and config_fields:
            raise ValueError(f"give either `config` or keyword options, not both (got {sorted(config_fields)})")
        if config is not None and not isinstance(config, DGCConfig):
            raise ValueError(f"`config` must be a DGCConfig, got {type(config).__name__}")
        known = {f.name for f in fields(DGCConfig)}
        unknown = sorted(set(config_fields) - known)
        if unknown:
            raise ValueError(f"unknown option `{unknown[0]}`; allowed: {', '.join(sorted(known))}")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                f"`process_group` must be a torch.distributed.ProcessGroup or None (the default group), got "
                f"{process_group!r}; the backend is chosen by init_process_group, not here"
            )
        self.process_group = process_group
        self.engine = CompressionEngine(config if config is not None else DGCConfig(**config_fields),
                                        grad_scaler=grad_scaler)
        self._names: dict[int, str] = {}
        self._bound = False
        self._model: nn.Module | None = None
        self._sizes: dict[str, int] = {}
        self._layouts: dict[tuple[int, ...], BucketLayout] = {}
        self._optimizer_steps = 0
        self._handles: list[Any] = []
        self._removed = False
        if model is not None:
            self.bind(model)
        if optimizer is not None:
            check_optimizer(self, optimizer)
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))

    # ------------------------------------------------------------------ the engine's state, by name

    @property
    def config(self) -> DGCConfig:
        return self.engine.config

    @property
    def grad_scaler(self) -> Any:
        return self.engine.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        self.engine.grad_scaler = scaler

    @property
    def step_count(self) -> int:
        """Synced steps taken (the hook counts at DDP's last bucket; ``no_sync`` steps do not count)."""
        return self.engine.step_count

    @property
    def residuals(self) -> dict[str, torch.Tensor]:
        return self.engine.residuals

    @property
    def momenta(self) -> dict[str, torch.Tensor]:
        return self.engine.momenta

    @property
    def loss_scale(self) -> torch.Tensor | None:
        return self.engine.loss_scale

    @property
    def last_stats(self) -> dict[str, float]:
        return self.engine.last_stats

    @property
    def totals(self) -> dict[str, float]:
        return self.engine.totals

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose state update was skipped because some rank's gradient was not finite (synchronises)."""
        return self.engine.nonfinite_steps

    @property
    def removed(self) -> bool:
        """True after :meth:`remove`: the hook then averages with a plain all-reduce."""
        return self._removed

    # ------------------------------------------------------------------ naming

    def bind(self, module: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> DGCState:
        """Key the state by parameter names: a module's (a DDP wrapper's ``module.`` prefix is
        dropped; the state is then attached to the module and follows its gradient masks) or given
        ``(name, parameter)`` pairs.

        Raises:
            ValueError: not a module or pairs, duplicate names, or the state already holds
                residuals keyed by first appearance.
        """
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        model = None
        if isinstance(module, nn.Module):
            named = list(module.named_parameters())
            model = module
        else:
            try:
                named = [(str(n), p) for n, p in module]
            except (TypeError, ValueError):
                raise ValueError(
                    f"`module` must be an nn.Module or (name, parameter) pairs, got {type(module).__name__}"
                ) from None
            if not all(isinstance(p, torch.Tensor) for _, p in named):
                raise ValueError("`module`: every (name, parameter) pair must hold a tensor")
            if len({n for n, _ in named}) != len(named):
                raise ValueError("`module`: parameter names must be unique")
        if model is not None:
            sparse = [n for n, m in model.named_modules()
                      if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
            if sparse:
                raise ValueError(
                    f"`model` has embeddings with sparse=True ({', '.join(sparse)}): their sparse gradients cannot "
                    "be compressed (DDP's communication hooks take dense buckets); build them with sparse=False"
                )
        if not self._bound and any(k.startswith("#") for k in (*self.residuals, *self.momenta)):
            raise ValueError("`module`: bind before the first step; this state is already keyed by position")
        if self._model is not None and self._model is not model:
            contract.detach(self._model, self)
        if model is not None:
            contract.attach(model, self)
        self._names = {id(p): name for name, p in named}
        self._sizes = {key: size for name, p in named for key, size in _slices(name, p)}
        self._bound = True
        self._model = model
        self._layouts.clear()
        self.engine.model = model
        self.engine.reset_plans()
        return self

    def register(self, model: nn.Module) -> DGCState:
        """Bind ``model``'s parameter names and register :func:`dgc_hook` on it.

        Args:
            model: a ``DistributedDataParallel`` model.

        Raises:
            ValueError: ``model`` is not ``DistributedDataParallel``.
            RuntimeError: DDP already has a communication hook (DDP's own check).
        """
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                f"`model` must be a torch.nn.parallel.DistributedDataParallel (wrap it first), "
                f"got {type(model).__name__}"
            )
        self.bind(model.module)
        model.register_comm_hook(self, dgc_hook)
        return self

    def bucket_layout(self, params: Iterable[torch.Tensor]) -> BucketLayout:
        """The names and shapes of ``params`` flattened one after another (what the engine compresses).

        Raises:
            ValueError: a model is bound and a parameter is not in it.
        """
        params = list(params)
        key = tuple(id(p) for p in params)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 256:
                self._layouts.clear()
            pieces = [(k, shape) for p in params for k, shape in _slice_shapes(self._key(p), p)]
            layout = self._layouts[key] = BucketLayout(tuple(k for k, _ in pieces), tuple(s for _, s in pieces))
        return layout

    def _key(self, p: torch.Tensor) -> str:
        key = self._names.get(id(p))
        if key is None:
            if self._bound:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} reached the hook but is not in the bound module"
                )
            key = self._names[id(p)] = f"#{len(self._names)}"
        return key

    # ------------------------------------------------------------------ the component lifecycle

    @property
    def step(self) -> _StepCount:
        """``step()``: account for one optimizer step (what every component's ``step()`` means).

        The hook counts synced steps itself (``step_count``); ``step()`` clears the state outside
        gradient masks that changed during the optimizer step, and runs :meth:`check_ranks` every
        ``verify_every`` optimizer steps. Given ``optimizer=``, its step hook calls it. Read as a
        number, ``step`` is ``step_count`` (deprecated, with a ``FutureWarning``).
        """
        return _StepCount(self.engine.step_count, self._step)

    def _step(self) -> None:
        _gloo.wait_for_release()  # what this step's hooks handed gloo
        self._optimizer_steps += 1
        self.engine.follow_masks()
        n = self.config.verify_every
        if n and self._optimizer_steps % n == 0:
            self.check_ranks()

    def statistics(self) -> dict[str, float]:
        """The last synced step's figures and the run's totals, as flat ``compression/...`` floats.

        Returns:
            ``compression/step`` (synced steps taken), ``compression/density`` (the density the
            last step used), ``compression/sent_fraction`` (elements sent / elements),
            ``compression/payload_bytes`` (what this rank put into collectives),
            ``compression/wire_bytes`` (per-rank traffic under the ring model: ``(W-1)·payload``
            for an all-gather, ``2(W-1)/W·bytes`` for an all-reduce),
            ``compression/dense_payload_bytes`` and ``compression/dense_wire_bytes`` (the same
            for an fp32 all-reduce), ``compression/ratio`` (dense wire bytes / wire bytes),
            ``compression/compress_s`` (host seconds compressing), ``compression/sparse_buckets``,
            ``compression/dense_buckets``; and ``compression/total_...`` for the run's sums of the
            bytes, ``compress_s`` and ``steps``, and ``compression/total_ratio``. Before the first
            step the last step's figures are zeros (density: the first step's, ratio: 1).
        """
        last, totals = self.last_stats, self.totals
        out = {"compression/step": float(self.engine.step_count)}
        for k in _LAST:
            out[f"compression/{k}"] = float(last.get(k, 0.0))
        if not last:
            out["compression/density"] = float(self.config.density_at(self.engine.step_count))
        wire = out["compression/wire_bytes"]
        out["compression/ratio"] = out["compression/dense_wire_bytes"] / wire if wire else 1.0
        for k in (*_TOTALS, "steps"):
            out[f"compression/total_{k}"] = float(totals.get(k, 0.0))
        wire = out["compression/total_wire_bytes"]
        out["compression/total_ratio"] = out["compression/total_dense_wire_bytes"] / wire if wire else 1.0
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        """Compression holds no masks: ``{}``."""
        return {}

    def check_ranks(self) -> None:
        """Check that every rank has taken the same number of synced steps with the same options.

        A collective: call it on every rank of the process group.

        Raises:
            contract.RankDivergenceError: on every rank, naming what differs.
        """
        cfg = zlib.crc32(repr(sorted(asdict(self.config).items())).encode())
        fingerprints = {"step_count": torch.tensor([self.engine.step_count], dtype=torch.int64),
                        "config": torch.tensor([cfg], dtype=torch.int64)}
        contract.check_in_sync(fingerprints, self.process_group,
                               what=f"compression state after synced step {self.engine.step_count}")

    def remove(self) -> None:
        """Detach from the model and remove the optimizer hook; the hook then does a plain averaging
        all-reduce (DDP cannot unregister a communication hook). The residuals are dropped."""
        if self._model is not None:
            contract.detach(self._model, self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._removed = True

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (rank-local): version, config, step, loss scale, residuals, momenta, totals."""
        return {"version": _STATE_VERSION, **self.engine.state_dict(), "config": asdict(self.config)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, of this or the previous version (1).

        Tensors move to the gradients' device at first use.

        Raises:
            ValueError: unknown version or malformed dict; a saved option that changes the math
                differs from this run's (naming it); a residual or momentum that is not a finite
                1-D float tensor, or names no parameter of the bound model or has its size
                (naming the parameter).
        """
        if not isinstance(state_dict, dict) or state_dict.get("version") not in _LOADABLE:
            got = state_dict.get("version") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"`state_dict` must be a DGCState state of version 1 or 2, got {got!r}")
        contract.check_config(state_dict.get("config"), self.config, MATH_FIELDS, "DGCState")
        sizes = self._sizes if self._bound else None
        for part in ("residuals", "momenta"):
            table = state_dict.get(part)
            if not isinstance(table, dict):
                raise ValueError(f"`state_dict[{part!r}]` must be a dict of tensors, got {type(table).__name__}")
            for name, t in table.items():
                _check_saved_tensor(part, name, t, sizes)
        if not isinstance(state_dict.get("step"), int) or state_dict["step"] < 0:
            raise ValueError(f"`state_dict['step']` must be an int >= 0, got {state_dict.get('step')!r}")
        self.engine.load_state_dict(state_dict)

    def full_state_dict(self) -> dict[str, Any]:
        """Every rank's :meth:`state_dict`, gathered on rank 0 (a collective: call it on all ranks).

        Residuals and momenta differ by rank, so a checkpoint written by rank 0 must carry all of
        them for a resumed run to be bit-identical to an uninterrupted one. Only rank 0 receives
        them (``ranks``); on the other ranks ``ranks`` is None.
        """
        own = _to_cpu(self.state_dict())
        world = _group_size(self.process_group)
        if world == 1:
            return {"version": _STATE_VERSION, "world_size": 1, "ranks": [own]}
        rank = _group_rank(self.process_group)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dst = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.gather_object(own, gathered, dst=dst, group=self.process_group)
        return {"version": _STATE_VERSION, "world_size": world, "ranks": gathered}

    def load_full_state_dict(self, full: dict[str, Any]) -> None:
        """Load this rank's part of what :meth:`full_state_dict` returned on rank 0 (version 1 or 2).

        On a different world size each rank gets the mean of the saved ranks' residuals and
        momenta (which keeps the averaged pending update unchanged), with a warning.

        Raises:
            ValueError: malformed dict (or one from a rank other than 0), or what
                :meth:`load_state_dict` refuses.
        """
        if not isinstance(full, dict) or "ranks" not in full or full.get("version") not in _LOADABLE:
            raise ValueError("`full` must come from DGCState.full_state_dict() (on rank 0)")
        ranks = full["ranks"]
        if not isinstance(ranks, list) or not ranks:
            raise ValueError(f"`full['ranks']` holds no rank's state (it must be a non-empty list of rank states, "
                             f"got {ranks!r}): load the dict that rank 0 got from full_state_dict()")
        world = _group_size(self.process_group)
        rank = _group_rank(self.process_group)
        if len(ranks) == world:
            self.load_state_dict(ranks[rank])
            return
        _warn.warn(
            f"DGC state was saved on {len(ranks)} ranks and is loaded on {world}: every rank starts from "
            "the mean of the saved residuals and momenta",
            stacklevel=2,
        )
        for part in ("residuals", "momenta"):
            first: dict[str, Any] | None = None
            for i, r in enumerate(ranks):
                table = r.get(part) if isinstance(r, dict) else None
                if not isinstance(table, dict) or (first is not None and table.keys() != first.keys()):
                    raise ValueError(f"`full['ranks'][{i}][{part!r}]` must be a dict of tensors with the same names "
                                     f"as rank 0's, got {type(table).__name__}")
                first = table if first is None else first
                for name, t in table.items():
                    _check_saved_tensor(part, name, t, None)
                    if t.shape != first[name].shape:
                        raise ValueError(f"`full['ranks'][{i}][{part!r}]` entry {name!r} has shape "
                                         f"{tuple(t.shape)}, rank 0's has {tuple(first[name].shape)}")
        merged = dict(ranks[0])
        for part in ("residuals", "momenta"):
            keys = ranks[0][part].keys()
            merged[part] = {k: torch.stack([r[part][k] for r in ranks]).mean(0) for k in keys}
        self.load_state_dict(merged)

    def __getstate__(self) -> dict[str, Any]:
        """The engine (without its model) and the step counts; not the process group, the parameter
        map or the hooks (torch's PowerSGDState)."""
        return {"engine": self.engine, "optimizer_steps": self._optimizer_steps, "removed": self._removed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore; the process group becomes the default group (with a warning) and must be re-bound."""
        warnings.warn(  # said by the rank that unpickles, whichever it is
            "DGCState unpickled: process group set to the default group; call bind(module) again if the "
            "state was keyed by parameter names",
            stacklevel=2,
        )
        self.process_group = None
        self._names, self._bound, self._model, self._sizes, self._layouts, self._handles = {}, False, None, {}, {}, []
        if "engine" in state:
            self.engine = state["engine"]
            self._optimizer_steps = state.get("optimizer_steps", 0)
            self._removed = state.get("removed", False)
            return
        # pickled by the previous release: the state's slots themselves
        self.engine = CompressionEngine(state["config"])
        self.engine.load_state_dict(state)
        self.engine.last_stats = dict(state.get("last_stats", {}))
        self._optimizer_steps, self._removed = 0, False


# ---------------------------------------------------------------------- stacked (expert) parameters

#: A parameter whose first dimension stacks independent weights (the ``[E, ...]`` weights of MoE experts,
#: :class:`sparsetrain.moe.GroupedExperts`) carries this attribute set to True: the compression then treats
#: each slice ``p[e]`` as a tensor of its own (its own top-k, residual and momentum, keyed ``"<name>.<e>"``),
#: as it would the weights of E separate layers, so no expert's gradient crowds out another's.
STACKED_ATTR = "_sparsetrain_stacked"


def _slice_shapes(name: str, p: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``[(key, shape)]``: the parameter itself, or each slice of a stacked one, in memory order."""
    if getattr(p, STACKED_ATTR, False) and p.dim() >= 2:
        return [(f"{name}.{e}", tuple(p.shape[1:])) for e in range(p.shape[0])]
    return [(name, tuple(p.shape))]


def _slices(name: str, p: torch.Tensor) -> list[tuple[str, int]]:
    return [(key, math.prod(shape)) for key, shape in _slice_shapes(name, p)]


def _check_saved_tensor(part: str, name: Any, t: Any, sizes: dict[str, int] | None) -> None:
    where = f"`state_dict[{part!r}]` entry {name!r}"
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 1:
        what = f"{t.dtype} tensor of {t.dim()} dimensions" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where} must be a 1-D float tensor, got a {what}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where} holds non-finite values")
    if sizes is not None:
        if name not in sizes:
            raise ValueError(f"{where} names no parameter of the bound model")
        if t.numel() != sizes[name]:
            raise ValueError(f"{where} has {t.numel()} elements, the parameter has {sizes[name]}")


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(_gloo.handed(out, group), _gloo.handed(inp, group), group=group, async_op=True)


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook for Deep Gradient Compression (see :mod:`sparsetrain.compression.engine`).

    Dense steps all-reduce the bucket (exactly ``allreduce_hook`` when there is no state
    to carry); sparse steps all-gather one packed message per rank
    (:mod:`sparsetrain.compression.wire`) and decode it with ``index_add_`` in rank order,
    so every rank computes bit-identical gradients. After :meth:`DGCState.remove` it is
    torch's ``allreduce_hook``.

    Args:
        state: the :class:`DGCState`.
        bucket: DDP's gradient bucket.

    Returns:
        A future holding the averaged flat gradient of the bucket.
    """
    group = state.process_group
    if state.removed:
        return default_hooks.allreduce_hook(group, bucket)
    engine = state.engine
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    message = engine.compress(buffer, state.bucket_layout(bucket.parameters()), world)
    send = message.send
    if message.collective == "all_gather":
        out = torch.empty(world * send.numel(), dtype=torch.uint8, device=send.device)
        fut = _all_gather(out, send, group).get_future()
    else:
        out = send
        fut = dist.all_reduce(_gloo.handed(send, group), group=group, async_op=True).get_future()
    if bucket.is_last():
        engine.end_step()

    def finish(_: torch.futures.Future) -> torch.Tensor:
        result = engine.decompress(message, out, out=buffer)
        if result is not buffer:
            buffer.copy_(result)
        return buffer

    return fut.then(_gloo.handed(finish, group))


# DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
dgc_hook.__annotations__ = {
    "state": DGCState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def check_optimizer(state: DGCState | DGCConfig, optimizer: torch.optim.Optimizer) -> None:
    """Fail when the optimizer would apply momentum on top of the hook's momentum correction.

    Raises:
        ValueError: ``optimizer`` is SGD with ``momentum`` > 0 while momentum correction is on,
            saying what to set instead.
    """
    cfg = state.config if isinstance(state, DGCState) else state
    if cfg.momentum <= 0:
        return
    if isinstance(optimizer, torch.optim.SGD):
        for i, group in enumerate(optimizer.param_groups):
            if group.get("momentum", 0) > 0:
                raise ValueError(
                    f"optimizer `momentum` must be 0 when the compression applies momentum correction "
                    f"(param group {i} has momentum={group['momentum']}): create SGD(momentum=0) and let "
                    f"the compression own momentum={cfg.momentum}, or set the compression's momentum=0"
                )
    else:
        _warn.warn(
            f"momentum correction (momentum={cfg.momentum}) assumes plain SGD; "
            f"{type(optimizer).__name__} adds its own moment estimates on top",
            stacklevel=2,
        )
