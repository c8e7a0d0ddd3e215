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
``grad_masking="step"`` before an update step) the bucket is all-reduced whole, or, with
``inactive_density``, the entries inside the masks travel packed and exact and, per masked weight
and rank, only the largest entries outside its mask travel (an all-gather of values and positions;
RigL only ranks them). With the default ``grad_masking="hook"`` RigL captures its dense gradient
before masking and reduces it itself, so the exchange stays packed on every step.

MoE layers (modules with a ``tokens_per_expert`` statistic, such as :class:`sparsetrain.moe.MoE`
without expert parallelism): the slices ``[e]`` of their stacked expert weights of an expert that
received no token on any rank in the step are left out of the packed vector (``skip_idle_experts``);
the ranks agree on them with one all-reduce of E flags per layer at the first bucket of the step.

One implementation serves every driver: :meth:`MaskedExchange.prepare` says what one bucket
sends (``(collective, tensor)`` pairs), :meth:`MaskedExchange.finish` writes the result back;
:func:`masked_hook` runs the collectives with torch.distributed, the Horovod optimizer
(:func:`sparsetrain.compression.horovod.DistributedOptimizer` with ``masked=``) with Horovod.

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
of 2 or more dimensions" still applies), a dense parameter keeps its shape. A stacked ``[E, ...]``
parameter (MoE experts, marked with :data:`~sparsetrain.compression.dgc.STACKED_ATTR`) is E tensors,
as plain DGC keys them: slice e is ``"<name>.<e>"`` of shape ``(P_e, 1)`` (its active entries) when
masked, of the slice's shape when not; so top-k, residuals and momenta are per expert. When the masks
change, the state is carried into the new packing (:func:`carry_packed`, slice by slice for a stack):
a position that stays active keeps what it held, a dropped one loses it (rule 3 of
``docs/architecture.md``), a grown one starts at 0. A step that needs dense gradients is served
only with ``inactive_density`` (the packed part through DGC, the part outside the masks as top-k);
DynamicSparsity's ``grad_masking="hook"`` never needs one.

Usage::

    >>> # xdoctest: +SKIP("needs an initialised process group")
    >>> sparsifier = DynamicSparsifier(model, method="rigl", sparsity=0.9, total_steps=10_000, optimizer=opt)
    >>> ddp = DistributedDataParallel(model)
    >>> exchange = MaskedExchange(model).register(ddp)   # or ddp.register_comm_hook(exchange, masked_hook)

Legend: N elements of a bucket, P packed elements of a bucket, W ranks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .. import _gloo, contract
from .dgc import STACKED_ATTR, _all_gather, _slice_shapes
from .engine import CompressionEngine
from .plan import MATH_FIELDS, BucketLayout, DGCConfig
from .topk import topk_indices

__all__ = ["BucketMessage", "MaskedExchange", "MaskedExchangeConfig", "carry_packed", "masked_hook"]

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
    """One bucket's packing: positions into the flat buffer, for one mask version, and the engine's layout.

    ``idx_P`` are the positions that travel exactly (None: the whole bucket, in place). ``inactive_Q``
    (with ``segments``: per masked parameter ``(start, end, k)`` in ``inactive_Q``) are the positions
    outside the masks, for the top-k of the inactive part on dense steps; built only when asked for.
    """

    __slots__ = ("version", "idx_P", "numel", "packed", "layout", "inactive_Q", "segments", "n_topk")

    def __init__(self, version: tuple, idx_P: torch.Tensor | None, numel: int, layout: BucketLayout,
                 inactive_Q: torch.Tensor | None = None, segments: tuple[tuple[int, int, int], ...] = ()) -> None:
        self.version = version
        self.idx_P = idx_P  # None: nothing masked in the bucket (sent whole, in place)
        self.numel = numel
        self.packed = numel if idx_P is None else int(idx_P.numel())
        # the packed tensors: (P, 1) for a masked weight, (P_e, 1) per expert slice of a masked stack, the
        # shape for a dense one (per slice for a stack)
        self.layout = layout
        self.inactive_Q = inactive_Q
        self.segments = segments
        self.n_topk = sum(k for _, _, k in segments)


@dataclasses.dataclass
class BucketMessage:
    """What one bucket sends, computed by :meth:`MaskedExchange.prepare` and read back by :meth:`MaskedExchange.finish`.

    Attributes:
        parts: ``(collective, tensor)`` pairs to exchange, in order: ``"mean"`` (all-reduce to the
            average of the ranks' tensors: DDP divides by W and sums, Horovod uses ``op=Average``),
            ``"sum"`` (all-reduce with a sum; the tensor is divided by W already) or ``"gather"``
            (all-gather, rank order, along the first dimension).
        buffer: the bucket's flat gradient, which :meth:`MaskedExchange.finish` overwrites with the result.
    """

    parts: list[tuple[str, torch.Tensor]]
    buffer: torch.Tensor
    packing: _Packing | None = None
    engine_message: Any = None
    world: int = 1


@dataclasses.dataclass(kw_only=True)
class MaskedExchangeConfig:
    """Options of :class:`MaskedExchange`.

    Args:
        compression: DGC on the packed vector (a :class:`~sparsetrain.compression.DGCConfig`, or its
            fields as a dict); None (default): the lossless plain all-reduce.
        verify_every: every this many optimizer steps (:meth:`MaskedExchange.step`),
            :meth:`MaskedExchange.check_ranks`; 0: never.
        inactive_density: on the steps where a component needs the dense gradient
            (``needs_dense_gradient()``: RigL with ``grad_masking="step"`` before an update), send
            the entries inside the masks exactly (packed) and, of every masked weight's entries
            outside its mask, only the ``ceil(inactive_density * n_outside)`` largest in magnitude
            of each rank (all-gathered as values and positions, summed and divided by W); the
            other outside entries arrive as 0. RigL only ranks the outside entries to choose its
            regrowth, so it then grows among those that some rank sent. None (default): those
            steps exchange the whole bucket.
        skip_idle_experts: the stacked expert weights (``[E, ...]``) of MoE layers (modules with a
            ``tokens_per_expert`` statistic, without expert parallelism) whose expert received no
            token on any rank in the step are left out of the packed vector (their gradient is 0
            everywhere, so the result is unchanged); the ranks agree on the experts with one
            all-reduce of E numbers per step. Only without ``compression`` (DGC's residuals must
            still travel for an expert without tokens).

    Raises:
        TypeError: ``compression`` is not a DGCConfig, a dict of its fields or None.
        ValueError: ``verify_every`` is not an int >= 0; ``inactive_density`` not in (0, 1];
            ``skip_idle_experts`` not a bool; a bad ``compression`` option.
    """

    compression: DGCConfig | None = None
    verify_every: int = 0
    inactive_density: float | None = None
    skip_idle_experts: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.verify_every, bool) or not isinstance(self.verify_every, int) or self.verify_every < 0:
            raise ValueError(f"`verify_every` must be an int >= 0, got {self.verify_every!r}")
        if isinstance(self.compression, dict):
            self.compression = DGCConfig(**self.compression)
        if self.compression is not None and not isinstance(self.compression, DGCConfig):
            raise TypeError(f"`compression` must be a DGCConfig, a dict of its fields or None, "
                            f"got {type(self.compression).__name__}")
        d = self.inactive_density
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1):
            raise ValueError(f"`inactive_density` must be None or a number in (0, 1], got {d!r}")
        if not isinstance(self.skip_idle_experts, bool):
            raise ValueError(f"`skip_idle_experts` must be a bool, got {self.skip_idle_experts!r}")


#: Fields of :class:`MaskedExchangeConfig` that change what is exchanged (checked on load).
_MATH_FIELDS = ("inactive_density",)


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
        "_stacked",
        "_packings",
        "_step_open",
        "_step_version",
        "_step_masks",
        "_step_dense",
        "_acc",
        "_optimizer_steps",
        "_removed",
        "_handles",
        "_experts",
        "_expert_params",
        "_seen_E",
        "_step_active",
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
        # stacked [E, ...] parameters (MoE experts): the engine sees each expert slice as a tensor of its own
        self._stacked = {n for n, p in model.named_parameters() if getattr(p, STACKED_ATTR, False) and p.dim() >= 2}
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
        # MoE layers whose idle experts are skipped: name -> (layer, E); parameter id -> (layer name, E)
        self._experts: dict[str, tuple[nn.Module, int]] = {}
        self._expert_params: dict[int, tuple[str, int]] = {}
        self._seen_E: dict[str, torch.Tensor] = {}  # this rank's experts that got tokens since the last exchange
        self._step_active: dict[str, tuple[bool, ...]] = {}  # the step's agreed experts with tokens on some rank
        contract.attach(model, self)
        if config.skip_idle_experts and compression is None:
            self._find_experts()
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

    # ------------------------------------------------------------------ MoE experts

    def _find_experts(self) -> None:
        """Find the MoE layers (a ``tokens_per_expert`` statistic, stacked ``[E, ...]`` expert weights, no
        expert parallelism) and record, after every forward, which of their experts got tokens."""
        for name, module in self._model.named_modules():
            if not isinstance(getattr(type(module), "tokens_per_expert", None), property):
                continue
            experts = getattr(module, "experts", None)
            E = getattr(module, "num_experts", None)
            if not isinstance(experts, nn.Module) or not isinstance(E, int) or getattr(module, "ep_size", 1) != 1:
                continue
            params = [p for p in experts.parameters() if p.dim() >= 1 and p.shape[0] == E]
            if not params:
                continue
            self._experts[name] = (module, E)
            for p in params:
                self._expert_params[id(p)] = (name, E)
            self._handles.append(module.register_forward_hook(self._make_expert_hook(name)))

    def _make_expert_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens = module.tokens_per_expert
            if tokens is None:
                return
            got = tokens.detach() > 0
            seen = self._seen_E.get(name)
            self._seen_E[name] = got if seen is None else seen | got.to(seen.device)

        return hook

    def _agree_experts(self, agree: Any) -> None:
        """The experts that got tokens on some rank since the last exchange (one all-reduce of E numbers)."""
        names = list(self._experts)
        local = [self._seen_E.get(n) for n in names]
        device = next((t.device for t in local if t is not None), torch.device("cpu"))
        flags = torch.cat([
            (t.to(device=device, dtype=torch.float32) if t is not None
             else torch.ones(self._experts[n][1], device=device))  # no forward seen: keep every expert
            for n, t in zip(names, local)
        ])
        self._seen_E = {}
        summed = agree(flags).tolist()  # the one host read (the packing is built from it)
        out, at = {}, 0
        for n in names:
            E = self._experts[n][1]
            out[n] = tuple(v > 0 for v in summed[at:at + E])
            at += E
        self._step_active = out

    # ------------------------------------------------------------------ packing

    def _open_step(self, agree: Any = None) -> None:
        """At the first bucket of a step: read the masks, their version, and whether this step goes dense;
        with MoE layers, agree (``agree(flags) -> summed flags``, a collective) on the experts with tokens."""
        self._step_open = True
        self._step_version, self._step_masks = contract.gradient_masks(self._model)
        self._step_dense = any(
            bool(getattr(c, "needs_dense_gradient", lambda: False)()) for c in contract.attached(self._model)
        )
        self._step_active = {}
        if self._experts and agree is not None:
            self._agree_experts(agree)
            idle = tuple(tuple(i for i, a in enumerate(v) if not a) for v in self._step_active.values())
            self._step_version = (*self._step_version, ("experts", idle))
        if self.engine is not None:
            if self._step_dense and self.config.inactive_density is None:
                raise ValueError(
                    "MaskedExchange(compression=...) cannot deliver the dense gradient a component needs this "
                    "step (DynamicSparsity with grad_masking='step' before a RigL update): use grad_masking='hook' "
                    "or set `inactive_density`"
                )
            self._carry_state()

    def _engine_masks(self) -> list[tuple[str, torch.Tensor]]:
        """The masks of the engine's tensors: a masked weight's, or, for a stacked one, each expert slice's
        (``"<name>.<e>"``, as plain DGC keys them)."""
        out: list[tuple[str, torch.Tensor]] = []
        for name, mask in self._step_masks.items():
            if name in self._stacked and mask.dim() >= 2:
                out += [(f"{name}.{e}", mask[e]) for e in range(mask.shape[0])]
            else:
                out.append((name, mask))
        return out

    def _carry_state(self) -> None:
        """Move the engine's residuals and momenta to the current packing of every masked weight (of every
        expert slice of a stacked one)."""
        moved = {}
        for name, mask in self._engine_masks():
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

    def packing(self, params: list[torch.Tensor], device: torch.device, *, inactive: bool = False) -> _Packing:
        """The packing of a bucket holding ``params`` (in order) for the current masks (and, with MoE
        layers, the step's experts with tokens); ``inactive``: also the positions outside the masks.

        Raises:
            ValueError: a parameter is not in the model, or its mask has another number of elements.
        """
        key = (tuple(id(p) for p in params), device, inactive)
        found = self._packings.get(key)
        if found is not None and found.version == self._step_version:
            return found
        parts, outside, segments, offset, restricted, names, shapes = [], [], [], 0, False, [], []
        density = self.config.inactive_density
        for p in params:
            name = self._names.get(id(p))
            if name is None:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} reached the hook but is not in the model")
            mask = self._step_masks.get(name)
            n = p.numel()
            names.append(name)
            keep = None
            if mask is not None:
                if mask.numel() != n:
                    raise ValueError(f"the gradient mask of {name!r} has {mask.numel()} elements, the parameter {n}")
                keep = mask.reshape(-1).to(device)
                if inactive:
                    out_Q = (~keep).nonzero().squeeze(1)
                    if out_Q.numel():
                        q = sum(int(o.numel()) for o in outside)
                        k = min(int(out_Q.numel()), max(1, math.ceil(density * out_Q.numel())))
                        segments.append((q, q + int(out_Q.numel()), k))
                        outside.append(out_Q.add_(offset))
            expert = self._expert_params.get(id(p))
            active = self._step_active.get(expert[0]) if expert is not None else None
            if active is not None and not all(active):
                rows = torch.tensor(active, dtype=torch.bool, device=device).repeat_interleave(n // expert[1])
                keep = rows if keep is None else keep & rows
            pieces = _slice_shapes(name, p)  # the tensor, or its expert slices (a stacked [E, ...] parameter)
            names[-1:] = [k for k, _ in pieces]
            if keep is None:
                parts.append(torch.arange(offset, offset + n, device=device))
                shapes += [shape for _, shape in pieces]
            else:
                restricted = True
                parts.append(keep.nonzero().squeeze(1).add_(offset))
                if len(pieces) == 1:
                    shapes.append((parts[-1].numel(), 1))
                else:  # each slice's active entries, in flat order: slice e is the next (P_e, 1)
                    shapes += [(c, 1) for c in keep.view(len(pieces), -1).sum(1).tolist()]
            offset += n
        idx_P = torch.cat(parts) if (restricted and parts) else None
        inactive_Q = torch.cat(outside) if outside else None
        if len(self._packings) > 256:
            self._packings.clear()
        packing = self._packings[key] = _Packing(self._step_version, idx_P, offset,
                                                 BucketLayout(tuple(names), tuple(shapes)), inactive_Q,
                                                 tuple(segments))
        self.rebuilds += 1
        return packing

    # ------------------------------------------------------------------ one bucket (the DDP hook and Horovod)

    def prepare(self, params: list[torch.Tensor], buffer_N: torch.Tensor, world: int, *,
                agree: Any = None) -> BucketMessage:
        """This rank's message for one bucket (the first bucket of a step opens the step).

        The one implementation of the exchange, driven by :func:`masked_hook` (DDP) and by
        :func:`sparsetrain.compression.horovod.DistributedOptimizer` (``masked=``): exchange every
        ``(collective, tensor)`` of ``message.parts``, then call :meth:`finish`; once every bucket of
        the step is prepared, :meth:`end_step`.

        Args:
            params: the bucket's parameters, in the order of ``buffer_N``.
            buffer_N: their flat local gradient (read; a dense bucket is sent in place).
            world: W, the number of ranks exchanging.
            agree: ``agree(flags_F) -> flags_F`` summed over the ranks (a blocking all-reduce), for the
                agreement on the MoE experts with tokens; None: no expert is skipped this step.
        """
        if not self._step_open:
            self._open_step(agree)
        nbytes = buffer_N.element_size()
        self._add(dense_payload_bytes=float(nbytes * buffer_N.numel()))
        split = self._step_dense and self.config.inactive_density is not None
        if self._step_dense and not split:
            self._add(payload_bytes=float(nbytes * buffer_N.numel()))
            return BucketMessage([("mean", buffer_N)], buffer_N, world=world)
        packing = self.packing(params, buffer_N.device, inactive=split)
        parts: list[tuple[str, torch.Tensor]] = []
        message = BucketMessage(parts, buffer_N, packing, world=world)
        idx_P = packing.idx_P
        if self.engine is not None:
            packed_P = buffer_N if idx_P is None else buffer_N.index_select(0, idx_P).float()
            message.engine_message = sent = self.engine.compress(packed_P, packing.layout, world)
            send = sent.send
            parts.append(("gather" if sent.collective == "all_gather" else "sum", send))
            self._add(payload_bytes=float(send.numel() * send.element_size()))
        else:
            packed_P = buffer_N if idx_P is None else buffer_N.index_select(0, idx_P)
            parts.append(("mean", packed_P))
            self._add(payload_bytes=float(nbytes * packed_P.numel()))
        if split and packing.inactive_Q is not None:
            parts.append(("gather", self._inactive_topk(buffer_N, packing)))
            self._add(payload_bytes=float(8 * packing.n_topk), inactive_sent=float(packing.n_topk),
                      inactive=float(packing.inactive_Q.numel()))
        return message

    @staticmethod
    def _inactive_topk(buffer_N: torch.Tensor, packing: _Packing) -> torch.Tensor:
        """Per masked weight, the ``k`` largest ``|g|`` outside its mask: ``[values_K, positions_K]``
        (float32; the int32 positions reinterpreted as float32 bits, so one all-gather carries both)."""
        out_Q = packing.inactive_Q
        vals_Q = buffer_N.index_select(0, out_Q)
        picked = [topk_indices(vals_Q[a:b], k).add_(a) for a, b, k in packing.segments]
        pos_K = out_Q.index_select(0, torch.cat(picked))
        vals_K = buffer_N.index_select(0, pos_K).float()
        return torch.cat([vals_K, pos_K.to(torch.int32).view(torch.float32)])

    def finish(self, message: BucketMessage, received: list[torch.Tensor]) -> torch.Tensor:
        """Write the averaged gradient of one bucket into its buffer and return the buffer.

        Args:
            message: what :meth:`prepare` returned.
            received: per entry of ``message.parts``, what the collective returned (the all-reduced
                tensor; for ``"gather"`` the W tensors one after another).
        """
        buffer_N, packing, world = message.buffer, message.packing, message.world
        if self.engine is not None and message.engine_message is not None:
            result_P = self.engine.decompress(message.engine_message, received[0])
        else:
            result_P = received[0]
        idx_P = None if packing is None else packing.idx_P
        if idx_P is None:
            if result_P is not buffer_N:
                buffer_N.copy_(result_P.reshape(-1))
        else:
            buffer_N.zero_()
            buffer_N.index_copy_(0, idx_P, result_P.reshape(-1).to(buffer_N.dtype))
        if len(received) > 1:  # the inactive part's top-k of every rank: sum / W
            K = packing.n_topk
            got_W2K = received[1].reshape(world, 2 * K)
            vals_WK = got_W2K[:, :K]
            pos_WK = got_W2K[:, K:].contiguous().view(torch.int32).long()
            for r in range(world):
                buffer_N.index_add_(0, pos_WK[r], (vals_WK[r] / world).to(buffer_N.dtype))
        return buffer_N

    def _add(self, **values: float) -> None:
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + v

    def end_step(self) -> None:
        """Every bucket of the step was prepared: close the step's statistics (and the engine's step)."""
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
            "inactive_sent_fraction": (acc.get("inactive_sent", 0.0) / acc["inactive"]) if acc.get("inactive")
            else 0.0,
            "idle_experts": float(sum(not a for v in self._step_active.values() for a in v)),
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
            went dense), ``exchange/inactive_sent_fraction`` (on a dense step with ``inactive_density``:
            the share of the entries outside the masks this rank sent), ``exchange/idle_experts`` (MoE
            experts skipped: no token on any rank), ``exchange/rebuilds`` (packings built), and
            ``exchange/total_...`` sums of the bytes, ``steps`` and ``dense_steps``.
        """
        out = {f"exchange/{k}": float(self.last_stats.get(k, 0.0)) for k in
               ("payload_bytes", "dense_payload_bytes", "packed_fraction", "mask_version", "dense_step",
                "inactive_sent_fraction", "idle_experts")}
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
        contract.check_config(state.get("config"), self.config, _MATH_FIELDS, "MaskedExchange")
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
        self._experts, self._expert_params, self._seen_E, self._step_active = {}, {}, {}, {}
        self.load_state_dict(state)


def masked_hook(state: MaskedExchange, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook of the sparsity-aware exchange (see :mod:`sparsetrain.compression.masked`).

    A bucket with no masked parameter, and every bucket of a step that needs dense gradients
    (without ``inactive_density``), is exactly torch's ``allreduce_hook``; otherwise ``buffer[idx] / W``
    is all-reduced and scattered back into a zeroed buffer (:meth:`MaskedExchange.prepare` /
    :meth:`MaskedExchange.finish`).

    Args:
        state: the :class:`MaskedExchange`.
        bucket: DDP's gradient bucket.

    Returns:
        A future holding the averaged flat gradient of the bucket.
    """
    group = state.process_group
    if state.removed:
        return default_hooks.allreduce_hook(group, bucket)
    world = dist.get_world_size(group)
    message = state.prepare(list(bucket.parameters()), bucket.buffer(), world, agree=_dist_agree(group))
    if bucket.is_last():
        state.end_step()
    futures, received = [], []
    for op, t in message.parts:
        if op == "gather":
            out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
            futures.append(_all_gather(out, t, group).get_future())
        else:
            if op == "mean":
                t.div_(world)
            out = t
            futures.append(dist.all_reduce(_gloo.handed(t, group), group=group, async_op=True).get_future())
        received.append(out)
    fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    return fut.then(_gloo.handed(lambda _: state.finish(message, received), group))


def _dist_agree(group: Any):
    def agree(flags: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(_gloo.handed(flags, group), group=group)
        return flags

    return agree


# DDP checks the hook's annotations as objects; this module's are strings (PEP 563).
masked_hook.__annotations__ = {
    "state": MaskedExchange,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}
