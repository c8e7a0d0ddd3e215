"""Sparsity-aware gradient exchange: all-reduce only the gradient entries inside the masks.

While a component that masks gradients (dynamic sparsity, ``masks_gradients = True``) is
attached to the model, the gradients of its pruned weights are zero before DDP reduces them
(rule 2 of ``docs/architecture.md``) and stay zero after. The masks are identical on every rank
(they are checked), so no index has to travel: each bucket's active entries are packed in a
fixed order, the packed vector is all-reduced with the ordinary all-reduce, and the result is
scattered back (the idea of PacTrain, arXiv 2505.18563; FIELD_NOTES section 7). Dense
parameters (biases, norms, layers left dense) travel whole, inside the same packed vector.

Per bucket the packing is a list of int64 positions into the bucket's flat buffer
(``offset + nonzero(mask)`` for a masked parameter, ``offset + arange(numel)`` for a dense
one), computed from the masks alone, so it is the same on every rank. It is rebuilt whenever
the version of ``contract.gradient_masks(model)`` changes (a mask update, a load), and at
DDP's bucket rebuild after the first iteration (the key is the bucket's parameters).

On the steps where a component needs the dense gradient from the exchange
(``needs_dense_gradient()`` of an attached component returns True: RigL with
``grad_masking="step"`` before an update step) the bucket is all-reduced whole. With the
default ``grad_masking="hook"`` RigL captures its dense gradient before masking and reduces it
itself, so the exchange stays packed on every step.

Lossless: every element of the result is ``sum_r g_r / W`` as in ``allreduce_hook`` (torch's
DDP hook: divide, then sum) inside the masks, and ``+0.0`` outside, where the dense exchange
averages gradients that are zero already (or, with ``grad_masking="step"``, that the
sparsifier zeroes right after). On 2 ranks a sum of two terms does not depend on the order, so
the result is bit-identical to the dense all-reduce; on 3 or more ranks the collective may add
the W terms of an element in another order for the shorter packed vector (gloo's ring splits
the vector into other chunks), which can change the last bits; DDP's built-in reducer also scales
by multiplying with ``1/W`` where this hook divides (as ``allreduce_hook`` does), the same value
for W = 2.

With ``compression=DGCConfig(...)`` the packed vector goes through DGC
(:class:`~sparsetrain.compression.engine.CompressionEngine`: top-k with error feedback and
momentum correction) instead of the plain all-reduce. The engine's residuals and momenta then
live in packed coordinates: a masked weight is the engine's tensor ``name`` of shape ``(P, 1)``
(its ``P`` active entries in flat order; two dimensions, so the engine's rule "compress tensors
of 2 or more dimensions" still applies), a dense parameter keeps its shape. When the masks change,
the state is carried into the new packing (:func:`carry_packed`): a position that stays active
keeps what it held, a dropped one loses it (rule 3 of ``docs/architecture.md``), a grown one
starts at 0. A step that needs dense gradients cannot be served in this mode (DynamicSparsity's
``grad_masking="hook"`` never needs one).

Usage::

    >>> # xdoctest: +SKIP("needs an initialised process group")
    >>> sparsifier = DynamicSparsifier(model, method="rigl", sparsity=0.9, total_steps=10_000, optimizer=opt)
    >>> ddp = DistributedDataParallel(model)
    >>> exchange = MaskedExchange(model).register(ddp)   # or ddp.register_comm_hook(exchange, masked_hook)

Legend: N elements of a bucket, P packed elements of a bucket, W ranks.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .. import _gloo, contract
from .engine import CompressionEngine
from .plan import MATH_FIELDS, BucketLayout, DGCConfig

__all__ = ["MaskedExchange", "MaskedExchangeConfig", "carry_packed", "masked_hook"]

_STATE_VERSION = 1
_TOTALS = ("payload_bytes", "dense_payload_bytes", "steps", "dense_steps")


def carry_packed(values_P: torch.Tensor, old_P: torch.Tensor, new_Q: torch.Tensor, numel: int) -> torch.Tensor:
    """State in packed coordinates carried from one packing of a tensor to another.

    Args:
        values_P: the state at the old packing's positions (any shape with ``P`` elements).
        old_P: the old packing's positions in the flat tensor (int64, ascending).
        new_Q: the new packing's positions (int64, ascending).
        numel: the tensor's number of elements.

    Returns:
        ``Q`` values: a position in both keeps its value, a new one gets 0 (a dropped one is lost).
    """
    flat = values_P.new_zeros(numel)
    flat.index_copy_(0, old_P.to(flat.device), values_P.reshape(-1))
    return flat.index_select(0, new_Q.to(flat.device))


class _Packing:
    """One bucket's packing: positions into the flat buffer, for one mask version, and the engine's layout."""

    __slots__ = ("version", "idx_P", "numel", "packed", "layout")

    def __init__(self, version: tuple[int, ...], idx_P: torch.Tensor | None, numel: int,
                 layout: BucketLayout) -> None:
        self.version = version
        self.idx_P = idx_P  # None: nothing masked in the bucket (sent whole, in place)
        self.numel = numel
        self.packed = numel if idx_P is None else int(idx_P.numel())
        self.layout = layout  # the packed tensors: (P, 1) for a masked weight, the shape for a dense one


@dataclasses.dataclass(kw_only=True)
class MaskedExchangeConfig:
    """Options of :class:`MaskedExchange`.

    Args:
        compression: DGC on the packed vector (a :class:`~sparsetrain.compression.DGCConfig`, or its
            fields as a dict); None (default): the lossless plain all-reduce.
        verify_every: every this many optimizer steps (:meth:`MaskedExchange.step`),
            :meth:`MaskedExchange.check_ranks`; 0: never.

    Raises:
        TypeError: ``compression`` is not a DGCConfig, a dict of its fields or None.
        ValueError: ``verify_every`` is not an int >= 0; a bad ``compression`` option.
    """

    compression: DGCConfig | None = None
    verify_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.verify_every, bool) or not isinstance(self.verify_every, int) or self.verify_every < 0:
            raise ValueError(f"`verify_every` must be an int >= 0, got {self.verify_every!r}")
        if isinstance(self.compression, dict):
            self.compression = DGCConfig(**self.compression)
        if self.compression is not None and not isinstance(self.compression, DGCConfig):
            raise TypeError(f"`compression` must be a DGCConfig, a dict of its fields or None, "
                            f"got {type(self.compression).__name__}")


class MaskedExchange:
    """The sparsity-aware exchange as a component: the state of :func:`masked_hook`.

    Args:
        model: the model (unwrapped or DDP) whose gradient masks (``contract.gradient_masks``)
            decide what travels; the exchange is attached to it (it claims no weight).
        config: a :class:`MaskedExchangeConfig`; or give its fields (``compression``,
            ``verify_every``) as keyword arguments instead (not both).
        optimizer: its step hook then calls :meth:`step`.
        process_group: the group the hook communicates over; None for the default group.

    Attributes:
        engine: the :class:`~sparsetrain.compression.engine.CompressionEngine` of ``compression``, or None.
        rebuilds: packings built so far (one per bucket and mask version).
        last_stats: the last synced step's figures (see :meth:`statistics`); ``totals``: their sums.

    Raises:
        TypeError: ``model`` is not a module; a bad ``compression``.
        ValueError: both ``config`` and keyword options; ``verify_every`` is not an int >= 0; a bad
            ``compression`` option.
    """

    #: The exchange masks nothing itself: it follows the masks of the components that do.
    masks_gradients = False

    __slots__ = (
        "process_group",
        "config",
        "verify_every",
        "engine",
        # internal state
        "_positions",
        "_model",
        "_names",
        "_packings",
        "_step_open",
        "_step_version",
        "_step_masks",
        "_step_dense",
        "_acc",
        "_optimizer_steps",
        "_removed",
        "_handles",
        # statistics
        "rebuilds",
        "last_stats",
        "totals",
        "__weakref__",
    )

    def __init__(self, model: nn.Module, config: MaskedExchangeConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, process_group: dist.ProcessGroup | None = None,
                 **config_fields: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None and config_fields:
            raise ValueError(f"give either `config` or keyword options, not both (got {sorted(config_fields)})")
        if config is not None and not isinstance(config, MaskedExchangeConfig):
            raise TypeError(f"`config` must be a MaskedExchangeConfig, got {type(config).__name__}")
        config = config if config is not None else MaskedExchangeConfig(**config_fields)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        compression, verify_every = config.compression, config.verify_every
        self.config = config
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.engine = None if compression is None else CompressionEngine(compression)
        self._positions: dict[str, torch.Tensor] = {}  # masked name -> flat positions the engine's state is at
        self.process_group = process_group
        self.verify_every = verify_every
        self._model = model
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._packings: dict[tuple[tuple[int, ...], torch.device], _Packing] = {}
        self._step_open = False
        self._step_version: tuple[int, ...] = ()
        self._step_masks: dict[str, torch.Tensor] = {}
        self._step_dense = False
        self._acc: dict[str, float] = {}
        self._optimizer_steps = 0
        self._removed = False
        self.rebuilds = 0
        self.last_stats: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self._handles: list[Any] = []
        contract.attach(model, self)
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.step()))

    # ------------------------------------------------------------------ wiring

    def register(self, model: nn.Module) -> MaskedExchange:
        """Register :func:`masked_hook` on a DDP model (before its first backward).

        Raises:
            ValueError: ``model`` is not ``DistributedDataParallel``, or wraps another module.
        """
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "`model` must be a torch.nn.parallel.DistributedDataParallel (wrap it first), "
                f"got {type(model).__name__}"
            )
        if model.module is not self._model:
            raise ValueError("`model` wraps another module than the one this MaskedExchange was built for")
        model.register_comm_hook(self, masked_hook)
        return self

    @property
    def removed(self) -> bool:
        """True after :meth:`remove`: the hook then averages with a plain all-reduce."""
        return self._removed

    # ------------------------------------------------------------------ packing

    def _open_step(self) -> None:
        """At the first bucket of a step: read the masks, their version, and whether this step goes dense."""
        self._step_open = True
        self._step_version, self._step_masks = contract.gradient_masks(self._model)
        self._step_dense = any(
            bool(getattr(c, "needs_dense_gradient", lambda: False)()) for c in contract.attached(self._model)
        )
        if self.engine is not None:
            if self._step_dense:
                raise ValueError(
                    "MaskedExchange(compression=...) cannot deliver the dense gradient a component needs this "
                    "step (DynamicSparsity with grad_masking='step' before a RigL update): use grad_masking='hook'"
                )
            self._carry_state()

    def _carry_state(self) -> None:
        """Move the engine's residuals and momenta to the current packing of every masked weight."""
        moved = {}
        for name, mask in self._step_masks.items():
            new = mask.reshape(-1).nonzero().squeeze(1)
            old = self._positions.get(name)
            if old is None or not torch.equal(old.to(new.device), new):
                moved[name] = (old, new, mask.numel())
            self._positions[name] = new
        if not moved:
            return
        state = self.engine.state_dict()
        for table in (state["residuals"], state["momenta"]):
            for name, (old, new, numel) in moved.items():
                t = table.get(name)
                if t is None:
                    continue
                if old is None:  # no record of its packing (a state from elsewhere): nothing can be kept
                    table[name] = t.new_zeros(new.numel())
                else:
                    table[name] = carry_packed(t, old, new, numel)
        self.engine.load_state_dict(state)

    def packing(self, params: list[torch.Tensor], device: torch.device) -> _Packing:
        """The packing of a bucket holding ``params`` (in order) for the current masks.

        Raises:
            ValueError: a parameter is not in the model, or its mask has another number of elements.
        """
        key = (tuple(id(p) for p in params), device)
        found = self._packings.get(key)
        if found is not None and found.version == self._step_version:
            return found
        parts, offset, masked_any, names, shapes = [], 0, False, [], []
        for p in params:
            name = self._names.get(id(p))
            if name is None:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} reached the hook but is not in the model")
            mask = self._step_masks.get(name)
            n = p.numel()
            names.append(name)
            if mask is None:
                parts.append(torch.arange(offset, offset + n, device=device))
                shapes.append(tuple(p.shape))
            else:
                if mask.numel() != n:
                    raise ValueError(f"the gradient mask of {name!r} has {mask.numel()} elements, the parameter {n}")
                masked_any = True
                parts.append(mask.reshape(-1).to(device).nonzero().squeeze(1).add_(offset))
                shapes.append((parts[-1].numel(), 1))
            offset += n
        idx_P = torch.cat(parts) if (masked_any and parts) else None
        if len(self._packings) > 256:
            self._packings.clear()
        packing = self._packings[key] = _Packing(self._step_version, idx_P, offset,
                                                 BucketLayout(tuple(names), tuple(shapes)))
        self.rebuilds += 1
        return packing

    def _add(self, **values: float) -> None:
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + v

    def _end_step(self) -> None:
        if self.engine is not None:
            self.engine.end_step()
        acc = self._acc
        dense = acc.get("dense_payload_bytes", 0.0)
        versions = self._step_version[1::2]
        self.last_stats = {
            "payload_bytes": acc.get("payload_bytes", 0.0),
            "dense_payload_bytes": dense,
            "packed_fraction": acc.get("payload_bytes", 0.0) / dense if dense else 1.0,
            "mask_version": float(sum(versions)),
            "dense_step": 1.0 if self._step_dense else 0.0,
        }
        for k in ("payload_bytes", "dense_payload_bytes"):
            self.totals[k] = self.totals.get(k, 0.0) + self.last_stats[k]
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1
        self.totals["dense_steps"] = self.totals.get("dense_steps", 0.0) + self.last_stats["dense_step"]
        self._acc = {}
        self._step_open = False

    # ------------------------------------------------------------------ the component lifecycle

    def step(self) -> None:
        """Account for one optimizer step; :meth:`check_ranks` every ``verify_every`` of them."""
        _gloo.wait_for_release()  # what this step's hooks handed gloo
        self._optimizer_steps += 1
        if self.verify_every and self._optimizer_steps % self.verify_every == 0:
            self.check_ranks()

    def statistics(self) -> dict[str, float]:
        """The last synced step's figures and the run's totals, as flat ``exchange/...`` floats.

        Returns:
            ``exchange/payload_bytes`` (bytes this rank put into the all-reduce),
            ``exchange/dense_payload_bytes`` (the same for the dense fp32 all-reduce),
            ``exchange/packed_fraction`` (their ratio), ``exchange/mask_version`` (the sum of the
            gradient-masking components' mask versions), ``exchange/dense_step`` (1.0 when the step
            went dense), ``exchange/rebuilds`` (packings built), and ``exchange/total_...`` sums of
            the bytes, ``steps`` and ``dense_steps``.
        """
        out = {f"exchange/{k}": float(self.last_stats.get(k, 0.0)) for k in
               ("payload_bytes", "dense_payload_bytes", "packed_fraction", "mask_version", "dense_step")}
        if not self.last_stats:
            out["exchange/packed_fraction"] = 1.0
        out["exchange/rebuilds"] = float(self.rebuilds)
        if self.engine is not None:
            last = self.engine.last_stats
            out["exchange/topk_payload_bytes"] = float(last.get("payload_bytes", 0.0))
            out["exchange/topk_sent_fraction"] = float(last.get("sent_fraction", 0.0))
        for k in _TOTALS:
            out[f"exchange/total_{k}"] = float(self.totals.get(k, 0.0))
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        """The exchange holds no masks: ``{}``."""
        return {}

    def check_ranks(self) -> None:
        """Check that every rank packs the same number of elements per bucket (a collective).

        Raises:
            contract.RankDivergenceError: on every rank, naming what differs.
        """
        version, masks = contract.gradient_masks(self._model)
        counts = torch.tensor([int(m.sum()) for m in masks.values()] or [0], dtype=torch.int64)
        steps = torch.tensor([self._optimizer_steps], dtype=torch.int64)
        contract.check_in_sync({"packed counts": counts, "steps": steps}, self.process_group,
                               what=f"masked exchange after optimizer step {self._optimizer_steps}")

    def remove(self) -> None:
        """Detach from the model; the hook then does a plain averaging all-reduce (DDP cannot
        unregister a communication hook)."""
        contract.detach(self._model, self)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._packings.clear()
        self._removed = True

    def state_dict(self) -> dict[str, Any]:
        """Version, optimizer steps and totals (the packing is rebuilt from the masks, not saved); with
        ``compression``, this rank's engine state (rank-local) and the packings its tensors are at."""
        out: dict[str, Any] = {"version": _STATE_VERSION, "optimizer_steps": self._optimizer_steps,
                               "totals": dict(self.totals), "config": dataclasses.asdict(self.config)}
        if self.engine is not None:
            out["compression"] = {**self.engine.state_dict(), "config": dataclasses.asdict(self.engine.config),
                                  "positions": {k: v.clone() for k, v in self._positions.items()}}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: not a state of this version, or malformed.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"`state` must be a MaskedExchange state of version {_STATE_VERSION}, got {got!r}")
        steps, totals = state.get("optimizer_steps"), state.get("totals")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`state['optimizer_steps']` must be an int >= 0, got {steps!r}")
        if not isinstance(totals, dict) or not all(isinstance(v, (int, float)) for v in totals.values()):
            raise ValueError(f"`state['totals']` must be a dict of numbers, got {totals!r}")
        comp = state.get("compression")
        if (comp is None) != (self.engine is None):
            raise ValueError("`state` was saved " + ("with" if comp is not None else "without") + " `compression`, "
                             "this MaskedExchange runs " + ("without" if self.engine is None else "with") + " it")
        if comp is not None:
            contract.check_config(comp.get("config"), self.engine.config, MATH_FIELDS, "MaskedExchange")
            positions = comp.get("positions")
            if not isinstance(positions, dict) or not all(
                isinstance(v, torch.Tensor) and v.dtype == torch.int64 and v.dim() == 1 for v in positions.values()
            ):
                raise ValueError("`state['compression']['positions']` must map names to 1-D int64 tensors")
            for part in ("residuals", "momenta"):
                table = comp.get(part)
                if not isinstance(table, dict) or not all(isinstance(v, torch.Tensor) and v.is_floating_point()
                                                          for v in table.values()):
                    raise ValueError(f"`state['compression'][{part!r}]` must map names to float tensors")
                for name, t in table.items():
                    if name in positions and t.numel() != positions[name].numel():
                        raise ValueError(f"`state['compression'][{part!r}][{name!r}]` has {t.numel()} elements, "
                                         f"its packing {positions[name].numel()}")
            self.engine.load_state_dict(comp)
            self._positions = {k: v.clone() for k, v in positions.items()}
        self._optimizer_steps = steps
        self.totals = {str(k): float(v) for k, v in totals.items()}
        self._packings.clear()

    def __getstate__(self) -> dict[str, Any]:
        """The state dict only (without ``compression``): not the process group, the model or the packings."""
        return {k: v for k, v in self.state_dict().items() if k != "compression"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        warnings.warn("MaskedExchange unpickled: it is bound to no model; build a new one and load_state_dict",
                      stacklevel=2)
        self.process_group, self.verify_every, self._model, self._names = None, 0, None, {}
        self.config, self.engine, self._positions = MaskedExchangeConfig(), None, {}
        self._packings, self._step_open, self._step_version, self._step_masks = {}, False, (), {}
        self._step_dense, self._acc, self._removed, self.rebuilds = False, {}, True, 0
        self.last_stats, self.totals, self._optimizer_steps, self._handles = {}, {}, 0, []
        self.load_state_dict(state)


def masked_hook(state: MaskedExchange, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook of the sparsity-aware exchange (see :mod:`sparsetrain.compression.masked`).

    A bucket with no masked parameter, and every bucket of a step that needs dense gradients, is
    exactly torch's ``allreduce_hook``; otherwise ``buffer[idx] / W`` is all-reduced and scattered
    back into a zeroed buffer.

    Args:
        state: the :class:`MaskedExchange`.
        bucket: DDP's gradient bucket.

    Returns:
        A future holding the averaged flat gradient of the bucket.
    """
    group = state.process_group
    if state.removed:
        return default_hooks.allreduce_hook(group, bucket)
    if not state._step_open:
        state._open_step()
    world = dist.get_world_size(group)
    buffer_N = bucket.buffer()
    nbytes = buffer_N.element_size()
    packing = None if state._step_dense else state.packing(list(bucket.parameters()), buffer_N.device)
    state._add(dense_payload_bytes=float(nbytes * buffer_N.numel()))
    if packing is not None and state.engine is not None:
        return _compressed(state, bucket, buffer_N, packing, world)
    if packing is None or packing.idx_P is None:
        state._add(payload_bytes=float(nbytes * buffer_N.numel()))
        if bucket.is_last():
            state._end_step()
        buffer_N.div_(world)
        fut = dist.all_reduce(_gloo.handed(buffer_N, group), group=group, async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            f.wait()  # raises the collective's error, if any
            return buffer_N

        return fut.then(_gloo.handed(done, group))
    idx_P = packing.idx_P
    packed_P = buffer_N.index_select(0, idx_P).div_(world)
    state._add(payload_bytes=float(nbytes * packed_P.numel()))
    if bucket.is_last():
        state._end_step()
    fut = dist.all_reduce(_gloo.handed(packed_P, group), group=group, async_op=True).get_future()

    def finish(_: torch.futures.Future) -> torch.Tensor:
        buffer_N.zero_()
        buffer_N.index_copy_(0, idx_P, packed_P)
        return buffer_N

    return fut.then(_gloo.handed(finish, group))


def _compressed(state: MaskedExchange, bucket: dist.GradBucket, buffer_N: torch.Tensor, packing: _Packing,
                world: int) -> torch.futures.Future[torch.Tensor]:
    """The packed vector (the whole bucket when nothing in it is masked) through the DGC engine, as
    :func:`~sparsetrain.compression.dgc_hook` sends a bucket."""
    engine, group, idx_P = state.engine, state.process_group, packing.idx_P
    packed_P = buffer_N if idx_P is None else buffer_N.index_select(0, idx_P).float()
    message = engine.compress(packed_P, packing.layout, world)
    send = message.send
    state._add(payload_bytes=float(send.numel() * send.element_size()))
    if message.collective == "all_gather":
        out = torch.empty(world * send.numel(), dtype=torch.uint8, device=send.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fut = gather(_gloo.handed(out, group), _gloo.handed(send, group), group=group, async_op=True).get_future()
    else:
        out = send
        fut = dist.all_reduce(_gloo.handed(send, group), group=group, async_op=True).get_future()
    if bucket.is_last():
        state._end_step()

    def finish(_: torch.futures.Future) -> torch.Tensor:
        result_P = engine.decompress(message, out)
        if idx_P is None:
            if result_P is not buffer_N:
                buffer_N.copy_(result_P)
            return buffer_N
        buffer_N.zero_()
        buffer_N.index_copy_(0, idx_P, result_P.to(buffer_N.dtype))
        return buffer_N

    return fut.then(_gloo.handed(finish, group))


# DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
masked_hook.__annotations__ = {
    "state": MaskedExchange,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
