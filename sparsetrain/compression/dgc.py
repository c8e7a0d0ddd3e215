"""Deep Gradient Compression as a DDP communication hook: ``DGCState`` and ``dgc_hook``.

Each rank sends only the largest entries of its accumulated gradient and keeps the rest
for later (Lin et al., "Deep Gradient Compression", ICLR 2018). Per parameter ``p`` with
local gradient ``g`` at step ``t`` (Sec. 3 of the paper; reference implementation
``synxlin/deep-gradient-compression``):

- local clipping (Sec. 3.2):   ``g <- g * min(1, c / (||g||_2 + 1e-6))``, ``c = clip_norm / sqrt(W)``;
- momentum correction (Eq. 5): ``u <- m u + g``, ``a = u``;
  Nesterov: ``u <- m (u + g)``, ``a = u + g``;  without momentum ``a = g``;
- error feedback (Eq. 2):      ``v <- v + a``; send ``v[I]`` with ``I`` the top-k of ``|v|``;
- masking (Sec. 3.2):          ``v[I] <- 0``, and ``u[I] <- 0`` (momentum factor masking);
- every rank adds the W messages and divides by W; the optimizer applies the result with
  plain SGD (no momentum of its own: the hook owns it).

Tensors with fewer than 2 dimensions or fewer than ``min_numel`` elements, every tensor
during the dense warm-up, and tensors for which the cost rule finds a dense all-reduce
cheaper are sent whole: ``a + v`` is all-reduced (the residual is flushed, ``v <- 0``) and
``u`` is not masked, so a dense step is exactly momentum SGD.

The state is per parameter, not per DDP bucket, so DDP's bucket rebuild after the first
iteration (and on every restart) does not disturb it. Nothing is committed to the state
before the exchange has completed and every rank's gradient was finite (AMP safety).

Legend: N elements of a bucket, K sparse slots of a bucket, W ranks.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from .. import contract
from .topk import num_selected, sample_stride, threshold_indices_segments, topk_indices
from .wire import DTYPES, SegmentLayout, encode_segments, pack, unpack

__all__ = [
    "DENSITY_RAMP",
    "DGCConfig",
    "DGCState",
    "check_optimizer",
    "dgc_hook",
]

#: DGC's warm-up densities (paper Sec. 3.3: sparsity 75%, 93.75%, 98.4375%, 99.6%), then the target.
DENSITY_RAMP = (0.25, 0.0625, 0.015625, 0.00390625)
_STATE_VERSION = 1


@dataclass(kw_only=True)
class DGCConfig:
    """Hyperparameters of Deep Gradient Compression.

    Args:
        density: fraction of each compressed tensor sent per step, in (0, 1] (DGC: 0.001).
        warmup_steps: synced steps of plain dense all-reduce before compression starts; at
            least 2, because DDP rebuilds its buckets after the first iteration (torch's
            PowerSGD has the same rule).
        ramp_steps: steps after the warm-up over which the density falls through
            ``DENSITY_RAMP`` (25%, 6.25%, 1.56%, 0.39%; a quarter of the steps each, never
            below ``density``) to ``density``; 0 goes straight to ``density``.
        momentum: momentum factor of momentum correction, in [0, 1); 0 turns it off (plain
            error feedback). When > 0 the optimizer must not apply momentum itself.
        nesterov: Nesterov momentum correction (needs ``momentum`` > 0).
        momentum_masking: zero the momentum at sent positions (momentum factor masking).
        error_feedback: keep what was not sent and add it to the next step's gradient.
        clip_norm: local gradient clipping: each tensor's local gradient is scaled to L2 norm
            at most ``clip_norm / sqrt(W)``; None turns it off.
        selection: ``"topk"`` (exact ``torch.topk``) or ``"threshold"`` (DGC's sampled
            threshold; see :mod:`sparsetrain.compression.topk`).
        sample_ratio: fraction of a tensor sampled by the threshold selection, in (0, 1].
        min_numel: tensors with fewer elements are sent whole.
        value_dtype: dtype of the sent values: ``"fp32"``, ``"fp16"`` (scaled per message so
            nothing overflows) or ``"bf16"``. Rounding errors go back into the residual.
        cost_rule: send a tensor densely whenever the sparse all-gather would move more bytes
            than a ring all-reduce (``W * k * (4 + value bytes) >= 2 * n * fallback bytes``),
            e.g. at high density or on many ranks.
        fallback_dtype: dtype of dense all-reduces after the warm-up: ``"fp32"`` or ``"bf16"``.
        check_finite: never let a non-finite gradient into the residual or momentum; a step
            where any rank's bucket held one leaves the state untouched and delivers
            non-finite gradients to every rank, so that a ``GradScaler`` skips it.

    Raises:
        ValueError: an option outside its range, naming it.
    """

    density: float = 0.001
    warmup_steps: int = 10
    ramp_steps: int = 100
    momentum: float = 0.0
    nesterov: bool = False
    momentum_masking: bool = True
    error_feedback: bool = True
    clip_norm: float | None = None
    selection: Literal["topk", "threshold"] = "threshold"
    sample_ratio: float = 0.01
    min_numel: int = 1024
    value_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    cost_rule: bool = True
    fallback_dtype: Literal["fp32", "bf16"] = "fp32"
    check_finite: bool = True

    def __post_init__(self) -> None:
        _check_number("density", self.density, float)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"`density` must be in (0, 1], got {self.density}")
        _check_number("warmup_steps", self.warmup_steps, int)
        if self.warmup_steps < 2:
            raise ValueError(
                f"`warmup_steps` must be >= 2 (DDP rebuilds its buckets after the first iteration), "
                f"got {self.warmup_steps}"
            )
        _check_number("ramp_steps", self.ramp_steps, int)
        if self.ramp_steps < 0:
            raise ValueError(f"`ramp_steps` must be >= 0, got {self.ramp_steps}")
        _check_number("momentum", self.momentum, float)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("`nesterov` needs `momentum` > 0, got momentum=0")
        if self.clip_norm is not None:
            _check_number("clip_norm", self.clip_norm, float)
            if not self.clip_norm > 0:
                raise ValueError(f"`clip_norm` must be > 0 or None, got {self.clip_norm}")
        if self.selection not in ("topk", "threshold"):
            raise ValueError(f"`selection` must be 'topk' or 'threshold', got {self.selection!r}")
        _check_number("sample_ratio", self.sample_ratio, float)
        if not 0.0 < self.sample_ratio <= 1.0:
            raise ValueError(f"`sample_ratio` must be in (0, 1], got {self.sample_ratio}")
        _check_number("min_numel", self.min_numel, int)
        if self.min_numel < 1:
            raise ValueError(f"`min_numel` must be >= 1, got {self.min_numel}")
        if self.value_dtype not in DTYPES:
            raise ValueError(f"`value_dtype` must be 'fp32', 'fp16' or 'bf16', got {self.value_dtype!r}")
        if self.fallback_dtype not in ("fp32", "bf16"):
            raise ValueError(f"`fallback_dtype` must be 'fp32' or 'bf16', got {self.fallback_dtype!r}")
        for name in ("nesterov", "momentum_masking", "error_feedback", "cost_rule", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")

    def density_at(self, step: int) -> float:
        """Density at synced step ``step`` (0-based); 1.0 during the dense warm-up."""
        if step < self.warmup_steps:
            return 1.0
        t = step - self.warmup_steps
        if self.ramp_steps and t < self.ramp_steps:
            return max(self.density, DENSITY_RAMP[t * len(DENSITY_RAMP) // self.ramp_steps])
        return self.density


def _check_number(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool):
        raise ValueError(f"`{name}` must be a{'n int' if kind is int else ' number'}, got {value!r}")


@dataclass
class _Entry:
    """One parameter of a bucket in one step's plan."""

    key: str
    offset: int
    numel: int
    compressible: bool
    sparse: bool
    k: int = 0
    stride: int = 1
    slot: int = 0  # first sparse slot in the message


@dataclass
class _Plan:
    """How one bucket (a fixed list of parameters) is exchanged at one density."""

    entries: list[_Entry]
    numel: int
    layout: SegmentLayout
    sparse: bool
    _index: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)

    @property
    def sparse_entries(self) -> list[_Entry]:
        return [e for e in self.entries if e.sparse]

    @property
    def compressible(self) -> list[_Entry]:
        return [e for e in self.entries if e.compressible]

    def positions(self, which: str, device: torch.device) -> torch.Tensor:
        """Cached int64 index tensors: ``"dense"`` (elements not sent sparsely), ``"fixed"`` (elements
        of tensors that are never compressed), ``"slot_entry"`` (sparse entry of each message slot)."""
        t = self._index.get((which, device))
        if t is None:
            if which == "slot_entry":
                ks = [e.k for e in self.sparse_entries]
                t = torch.repeat_interleave(torch.arange(len(ks)), torch.tensor(ks, dtype=torch.long))
            else:
                keep = (lambda e: not e.sparse) if which == "dense" else (lambda e: not e.compressible)
                parts = [torch.arange(e.offset, e.offset + e.numel) for e in self.entries if keep(e)]
                t = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            t = self._index[(which, device)] = t.to(device)
        return t


@dataclass
class _Pending:
    """What one bucket computed before the exchange and commits after it."""

    plan: _Plan
    fast: bool
    world: int = 1
    bf16_dense: bool = False
    u_old: torch.Tensor | None = None
    u_new: torch.Tensor | None = None
    v_old: torch.Tensor | None = None
    total: torch.Tensor | None = None
    idx_real: torch.Tensor | None = None  # positions sent (no padding)
    idx_msg: torch.Tensor | None = None  # message slots (padding: position 0, value 0)
    sent_msg: torch.Tensor | None = None  # the values as the receivers decode them, per slot
    send: torch.Tensor | None = None
    result: torch.Tensor | None = None

    @property
    def commit(self) -> bool:
        return not self.fast


class DGCState:
    """State of :func:`dgc_hook`: hyperparameters, per-parameter residuals and momenta, statistics.

    Register it like any DDP communication hook::

        >>> # xdoctest: +SKIP("needs an initialised process group")
        >>> state = DGCState(density=0.001, momentum=0.9, module=model)
        >>> ddp = DistributedDataParallel(model)
        >>> ddp.register_comm_hook(state, dgc_hook)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)   # no momentum: the hook owns it
        >>> check_optimizer(state, opt)

    or through Lightning's ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=dgc_hook)`` on CUDA
    (Lightning ignores comm hooks on CPU; use :class:`sparsetrain.callbacks.GradientCompression`).

    The state is keyed by parameter name when a ``module`` is bound (``module=`` or
    :meth:`bind`), else by order of first appearance in DDP's first synced iteration (the
    same on every rank and every restart of the same model).

    Args:
        process_group: the group the hook communicates over; None for the default group.
        config: a :class:`DGCConfig`; or give its fields as keyword arguments instead.
        module: the model (unwrapped or DDP) whose parameter names key the state.
        grad_scaler: a ``torch.amp.GradScaler`` whose loss scale the gradients carry; the
            residuals and momenta are rescaled whenever the scale changes, and the clip
            threshold follows it.
        **kwargs: :class:`DGCConfig` fields.

    Attributes:
        step: synced steps taken (the hook counts at DDP's last bucket).
        residuals: parameter name -> this rank's unsent accumulated gradient (flat, float32).
        momenta: parameter name -> this rank's momentum ``u`` (flat, float32).
        last_stats: statistics of the last step (see the guide); ``totals``: their sums.

    The tensors in ``residuals`` and ``momenta`` are replaced every step, and their memory is
    reused for later steps: clone them (or use :meth:`state_dict`) to keep a copy.

    Raises:
        ValueError: a bad option, or both ``config`` and keyword options.
    """

    __slots__ = (
        "process_group",
        # hyperparameters
        "config",
        "grad_scaler",
        # internal state
        "step",
        "residuals",
        "momenta",
        "loss_scale",
        "_names",
        "_bound",
        "_model",
        "_mask_version",
        "_plans",
        "_lock",
        "_step_open",
        "_scale_ratio",
        "_scale_now",
        "_nonfinite",
        "_n_prepared",
        "_expected",
        "_done",
        "_pool",
        # statistics
        "last_stats",
        "totals",
        "_acc",
    )

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        config: DGCConfig | None = None,
        *,
        module: nn.Module | None = None,
        grad_scaler: Any = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and kwargs:
            raise ValueError(f"give either `config` or keyword options, not both (got {sorted(kwargs)})")
        if config is not None and not isinstance(config, DGCConfig):
            raise ValueError(f"`config` must be a DGCConfig, got {type(config).__name__}")
        known = {f.name for f in fields(DGCConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown option `{unknown[0]}`; allowed: {', '.join(sorted(known))}")
        self.process_group = process_group
        self.config = config if config is not None else DGCConfig(**kwargs)
        self.grad_scaler = grad_scaler
        self.step = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self.momenta: dict[str, torch.Tensor] = {}
        self.loss_scale: torch.Tensor | None = None
        self._names: dict[int, str] = {}
        self._bound = False
        self._model: nn.Module | None = None
        self._mask_version: tuple[int, ...] | None = None
        self._plans: dict[tuple, _Plan] = {}
        self._lock = threading.Lock()
        self._step_open = False
        self._scale_ratio: torch.Tensor | None = None
        self._scale_now: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None
        self._n_prepared = 0
        self._expected: int | None = None
        self._done: list[tuple[_Pending, torch.Tensor | None]] = []
        self._pool: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
        self.last_stats: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self._acc: dict[str, float] = {}
        if module is not None:
            self.bind(module)

    # ------------------------------------------------------------------ naming

    def bind(self, module: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> DGCState:
        """Key the state by parameter names: a module's (a DDP wrapper's ``module.`` prefix is
        dropped) or given ``(name, parameter)`` pairs.

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
        if not self._bound and any(k.startswith("#") for k in (*self.residuals, *self.momenta)):
            raise ValueError("`module`: bind before the first step; this state is already keyed by position")
        self._names = {id(p): name for name, p in named}
        self._bound = True
        self._model = model
        self._mask_version = None
        self._plans.clear()
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

    def _key(self, p: torch.Tensor) -> str:
        key = self._names.get(id(p))
        if key is None:
            if self._bound:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} reached the hook but is not in the bound module"
                )
            key = self._names[id(p)] = f"#{len(self._names)}"
        return key

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: step, loss scale, residuals, momenta, statistics (tensors and plain Python)."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "loss_scale": None if self.loss_scale is None else float(self.loss_scale),
            "residuals": {k: v.detach().clone() for k, v in self.residuals.items()},
            "momenta": {k: v.detach().clone() for k, v in self.momenta.items()},
            "totals": dict(self.totals),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors move to the gradients' device at first use).

        Raises:
            ValueError: unknown version or malformed dict.
        """
        if not isinstance(state_dict, dict) or state_dict.get("version") != _STATE_VERSION:
            got = state_dict.get("version") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"`state_dict` must be a DGCState state of version {_STATE_VERSION}, got {got!r}")
        self.step = int(state_dict["step"])
        ls = state_dict.get("loss_scale")
        self.loss_scale = None if ls is None else torch.tensor(float(ls))
        self.residuals = {k: v.detach().clone() for k, v in state_dict["residuals"].items()}
        self.momenta = {k: v.detach().clone() for k, v in state_dict["momenta"].items()}
        self.totals = dict(state_dict.get("totals", {}))
        self._plans.clear()
        self._mask_version = None  # the loaded state is cleared outside the masks at the next step

    def full_state_dict(self) -> dict[str, Any]:
        """Every rank's :meth:`state_dict`, gathered (a collective: call it on all ranks).

        Residuals and momenta differ by rank, so a checkpoint written by one rank must carry
        all of them for a resumed run to be bit-identical to an uninterrupted one.
        """
        own = _to_cpu(self.state_dict())
        world = _group_size(self.process_group)
        if world == 1:
            return {"version": _STATE_VERSION, "world_size": 1, "ranks": [own]}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, own, group=self.process_group)
        return {"version": _STATE_VERSION, "world_size": world, "ranks": gathered}

    def load_full_state_dict(self, full: dict[str, Any]) -> None:
        """Load this rank's part of :meth:`full_state_dict`.

        On a different world size each rank gets the mean of the saved ranks' residuals and
        momenta (which keeps the averaged pending update unchanged), with a warning.

        Raises:
            ValueError: malformed dict.
        """
        if not isinstance(full, dict) or "ranks" not in full or full.get("version") != _STATE_VERSION:
            raise ValueError("`full` must come from DGCState.full_state_dict()")
        ranks = full["ranks"]
        world = _group_size(self.process_group)
        rank = _group_rank(self.process_group)
        if len(ranks) == world:
            self.load_state_dict(ranks[rank])
            return
        warnings.warn(
            f"DGC state was saved on {len(ranks)} ranks and is loaded on {world}: every rank starts from "
            "the mean of the saved residuals and momenta",
            stacklevel=2,
        )
        merged = dict(ranks[0])
        for part in ("residuals", "momenta"):
            keys = ranks[0][part].keys()
            merged[part] = {k: torch.stack([r[part][k] for r in ranks]).mean(0) for k in keys}
        self.load_state_dict(merged)

    def __getstate__(self) -> dict[str, Any]:
        """Every slot but the process group, the parameter map, plans and locks (torch's PowerSGDState)."""
        skip = {"process_group", "grad_scaler", "_names", "_model", "_mask_version", "_plans", "_lock", "_done",
                "_expected", "_n_prepared", "_pool"}
        return {s: getattr(self, s) for s in self.__slots__ if s not in skip}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore; the process group becomes the default group (with a warning) and must be re-bound."""
        warnings.warn(
            "DGCState unpickled: process group set to the default group; call bind(module) again if the "
            "state was keyed by parameter names",
            stacklevel=2,
        )
        self.process_group = None
        self.grad_scaler = None
        self._names = {}
        self._model = None
        self._mask_version = None
        self._plans = {}
        self._lock = threading.Lock()
        self._done, self._expected, self._n_prepared, self._pool = [], None, 0, {}
        for slot, value in state.items():
            setattr(self, slot, value)

    # ------------------------------------------------------------------ statistics

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose state update was skipped because some rank's gradient was not finite (synchronises)."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def _add_stat(self, **values: float) -> None:
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + v

    def _end_step(self) -> None:
        acc = self._acc
        total = acc.get("elements", 0.0)
        stats = {
            "step": float(self.step),
            "density": self.config.density_at(self.step),
            "sent_fraction": acc.get("sent", 0.0) / total if total else 0.0,
            "payload_bytes": acc.get("payload_bytes", 0.0),
            "dense_payload_bytes": acc.get("dense_payload_bytes", 0.0),
            "wire_bytes": acc.get("wire_bytes", 0.0),
            "dense_wire_bytes": acc.get("dense_wire_bytes", 0.0),
            "compress_s": acc.get("compress_s", 0.0),
            "sparse_buckets": acc.get("sparse_buckets", 0.0),
            "dense_buckets": acc.get("dense_buckets", 0.0),
        }
        self.last_stats = stats
        for k in ("payload_bytes", "dense_payload_bytes", "wire_bytes", "dense_wire_bytes", "compress_s"):
            self.totals[k] = self.totals.get(k, 0.0) + stats[k]
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1
        self._acc = {}
        self._step_open = False
        self.step += 1
        with self._lock:
            self._expected, self._n_prepared = self._n_prepared, 0
            done = self._take_done()
        if done:
            self._commit_step(done)

    def _take_done(self) -> list[tuple[_Pending, torch.Tensor | None]] | None:
        """Under the lock: the step's finished buckets once all of them are in."""
        if self._expected is None or len(self._done) < self._expected:
            return None
        done, self._done, self._expected = self._done, [], None
        return done

    def _complete(self, pending: _Pending, ok: torch.Tensor | None) -> None:
        with self._lock:
            self._done.append((pending, ok))
            done = self._take_done()
        if done:
            self._commit_step(done)

    def _commit_step(self, done: list[tuple[_Pending, torch.Tensor | None]]) -> None:
        """Commit every bucket of a step, or none: a non-finite gradient anywhere skips the whole
        step's state update, as the GradScaler skips the whole optimizer step."""
        if not any(p.commit for p, _ in done):
            return
        oks = []
        if self.config.check_finite:
            for p, ok in done:
                if ok is None and p.fast and p.result is not None:
                    ok = torch.isfinite(p.result).all()
                if ok is not None:
                    oks.append(ok.reshape(1))
        ok = torch.cat([o.to(oks[0].device) for o in oks]).all() if oks else None
        if ok is not None:
            bad = (~ok).to(torch.int64)
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite.to(bad.device) + bad
        for p, _ in done:
            if p.commit:
                self._commit(p, ok)

    # ------------------------------------------------------------------ the algorithm

    def _plan(self, params: list[torch.Tensor], world: int, step: int) -> _Plan:
        cfg = self.config
        warm = step < cfg.warmup_steps
        density = cfg.density_at(step)
        cache_key = (tuple(id(p) for p in params), world, density, warm)
        plan = self._plans.get(cache_key)
        if plan is not None:
            return plan
        vb = torch.empty((), dtype=DTYPES[cfg.value_dtype]).element_size()
        fb = 4 if cfg.fallback_dtype == "fp32" else 2
        entries, offset, slot, n_dense = [], 0, 0, 0
        for p in params:
            n = p.numel()
            compressible = p.dim() >= 2 and n >= cfg.min_numel
            e = _Entry(key=self._key(p), offset=offset, numel=n, compressible=compressible, sparse=False)
            if compressible and not warm:
                k = num_selected(n, density)
                if not cfg.cost_rule or world * k * (4 + vb) < 2 * n * fb:
                    e.sparse, e.k, e.slot = True, k, slot
                    e.stride = sample_stride(n, density, cfg.sample_ratio) if cfg.selection == "threshold" else 1
                    slot += k
            if not e.sparse:
                n_dense += n
            entries.append(e)
            offset += n
        any_sparse = slot > 0
        n_scales = sum(e.sparse for e in entries)
        layout = SegmentLayout(slot, n_dense if any_sparse else 0, n_scales, DTYPES[cfg.value_dtype])
        plan = _Plan(entries=entries, numel=offset, layout=layout, sparse=any_sparse)
        if len(self._plans) > 256:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan

    def _follow_masks(self) -> None:
        """Rule 3 of ``docs/architecture.md``: never emit gradient outside the current gradient masks.

        When the masks of the components that mask gradients (``contract.gradient_masks``) have
        changed since the last step, the residuals and momenta are zeroed outside them, so that
        gradient accumulated at a position a mask update has just dropped is never sent. Afterwards
        the incoming gradients are zero there, and so the state stays zero there.
        """
        if self._model is None:
            return
        version, masks = contract.gradient_masks(self._model)
        if version == self._mask_version:
            return
        for table in (self.residuals, self.momenta):
            for name, t in table.items():
                mask = masks.get(name)
                if mask is None:
                    continue
                if mask.numel() != t.numel():
                    raise ValueError(
                        f"the gradient mask of parameter {name!r} has {mask.numel()} elements, "
                        f"its compression state has {t.numel()}"
                    )
                contract.mask_(t, mask.reshape(-1).to(t.device))
        self._mask_version = version

    def _begin_step(self, device: torch.device) -> None:
        """Once per step: clear the state outside changed gradient masks; follow the GradScaler's loss scale."""
        self._step_open = True
        self._follow_masks()
        self._scale_ratio = None
        self._scale_now = None
        scaler = self.grad_scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return
        cur = getattr(scaler, "_scale", None)
        cur = torch.tensor(float(scaler.get_scale())) if cur is None else cur.detach()
        cur = cur.to(device=device, dtype=torch.float32).reshape(())
        if self.loss_scale is not None:
            self._scale_ratio = cur / self.loss_scale.to(device)
        self._scale_now = cur.clone()
        self.loss_scale = self._scale_now

    def _flat_state(self, table: dict[str, torch.Tensor], plan: _Plan, entries: list[_Entry],
                    like: torch.Tensor) -> torch.Tensor | None:
        """The bucket-shaped float32 state of ``entries`` (zeros elsewhere), or None when none has any.

        After the first commit on a bucket the per-parameter tensors are views of one flat
        tensor, which is returned as is; otherwise (first step, loaded checkpoint, new bucket
        layout) it is assembled.
        """
        got = [table.get(e.key) for e in entries]
        if all(t is None for t in got):
            return None
        base = got[0]._base if got[0] is not None else None
        if (
            base is not None
            and base.numel() == plan.numel
            and base.device == like.device
            and all(t is not None and t._base is base and t.storage_offset() == e.offset for t, e in zip(got, entries))
            and (len(entries) == len(plan.entries) or self._zero_outside(base, plan, entries))
        ):
            return base
        flat = torch.zeros(plan.numel, dtype=torch.float32, device=like.device)
        for t, e in zip(got, entries):
            if t is None:
                continue
            if t.numel() != e.numel:
                raise ValueError(
                    f"saved state for parameter {e.key!r} has {t.numel()} elements, the parameter has {e.numel}"
                )
            flat[e.offset : e.offset + e.numel].copy_(t.reshape(-1))
        return flat

    @staticmethod
    def _zero_outside(base: torch.Tensor, plan: _Plan, entries: list[_Entry]) -> bool:
        # residual flats are kept zero outside the compressible tensors by _commit
        return entries == plan.compressible

    @staticmethod
    def _store(table: dict[str, torch.Tensor], flat: torch.Tensor, entries: list[_Entry]) -> None:
        for e in entries:
            table[e.key] = flat[e.offset : e.offset + e.numel]

    # Bucket-sized float32 temporaries (and the bool threshold mask) are recycled: on the CPU a fresh
    # allocation of this size costs more than the arithmetic done in it (the pages are returned to the
    # OS and faulted in again).
    def _take(self, like: torch.Tensor, dtype: torch.dtype = torch.float32, numel: int | None = None) -> torch.Tensor:
        n = like.numel() if numel is None else numel
        free = self._pool.get((n, like.device, dtype))
        return free.pop() if free else torch.empty(n, dtype=dtype, device=like.device)

    def _give(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is None or t.dtype not in (torch.float32, torch.bool) or t._base is not None:
                continue
            free = self._pool.setdefault((t.numel(), t.device, t.dtype), [])
            if len(free) < 4 and all(f is not t for f in free):
                free.append(t)

    def _prepare(
        self, flat_N: torch.Tensor, params: list[torch.Tensor], world: int
    ) -> tuple[_Pending, torch.Tensor]:
        """Compute this rank's message for one bucket; returns what to commit later and the tensor to send.

        The send tensor is a ``uint8`` segment for a sparse exchange (all-gather) or a float
        tensor of the bucket's size, already divided by ``world``, for a dense all-reduce (sum).
        """
        t0 = time.perf_counter()
        cfg = self.config
        if not self._step_open:
            self._begin_step(flat_N.device)
        self._n_prepared += 1
        plan = self._plan(params, world, self.step)
        ratio = self._scale_ratio
        bf16_dense = cfg.fallback_dtype == "bf16" and self.step >= cfg.warmup_steps and not plan.sparse
        u_old = self._flat_state(self.momenta, plan, plan.entries, flat_N) if cfg.momentum > 0 else None
        compressible = plan.compressible
        v_old = (
            self._flat_state(self.residuals, plan, compressible, flat_N)
            if cfg.error_feedback and compressible
            else None
        )
        self._add_stat(
            elements=float(plan.numel),
            dense_payload_bytes=4.0 * plan.numel,
            dense_wire_bytes=_ring_allreduce_bytes(4 * plan.numel, world),
        )
        pending = _Pending(plan, fast=False, world=world, bf16_dense=bf16_dense, u_old=u_old, v_old=v_old)
        if (
            not plan.sparse
            and cfg.momentum == 0
            and v_old is None
            and cfg.clip_norm is None
            and not bf16_dense
            and flat_N.dtype == torch.float32
        ):
            # Exactly torch's allreduce_hook: divide in place, all-reduce the bucket.
            pending.fast = True
            self._add_stat(
                sent=float(plan.numel),
                payload_bytes=4.0 * plan.numel,
                wire_bytes=_ring_allreduce_bytes(4 * plan.numel, world),
                dense_buckets=1.0,
                compress_s=time.perf_counter() - t0,
            )
            return pending, flat_N.div_(world)

        g = flat_N.float()
        g_is_view = flat_N.dtype == torch.float32
        if cfg.clip_norm is not None:
            g = g.clone() if g_is_view else g
            g_is_view = False
            clip = cfg.clip_norm / math.sqrt(world)
            if self._scale_now is not None:
                clip = self._scale_now * clip
            views = [g[e.offset : e.offset + e.numel] for e in plan.entries]
            coefs = [(clip / (torch.linalg.vector_norm(v) + 1e-6)).clamp(max=1.0) for v in views]
            torch._foreach_mul_(views, coefs)
        acc = g
        scratch = []
        if cfg.momentum > 0:
            u_new = self._take(g)
            if u_old is None:
                u_new.copy_(g) if not cfg.nesterov else torch.mul(g, cfg.momentum, out=u_new)
            else:
                u = u_old * ratio if ratio is not None else u_old
                if cfg.nesterov:
                    torch.add(u, g, out=u_new).mul_(cfg.momentum)
                else:
                    torch.add(g, u, alpha=cfg.momentum, out=u_new)
            pending.u_new = acc = u_new
            if cfg.nesterov:
                acc = torch.add(u_new, g, out=self._take(g))
                scratch.append(acc)
        if v_old is not None:
            total = torch.add(acc, v_old * ratio if ratio is not None else v_old, out=self._take(g))
        elif (g_is_view and acc is g) or acc is pending.u_new:
            total = self._take(g).copy_(acc)  # becomes the residual: shares memory with neither bucket nor momentum
        else:
            total = acc
            scratch.clear()
        pending.total = total

        if plan.sparse:
            send = self._pack_sparse(pending, flat_N)
            self._give(*scratch)
            self._add_stat(
                sparse_buckets=1.0,
                payload_bytes=float(plan.layout.nbytes),
                wire_bytes=float((world - 1) * plan.layout.nbytes),
            )
        else:
            send = torch.div(total, world, out=self._take(g)) if not bf16_dense else (total / world).bfloat16()
            pending.send = send
            self._give(*scratch)
            nbytes = send.numel() * send.element_size()
            self._add_stat(
                sent=float(plan.numel),
                dense_buckets=1.0,
                payload_bytes=float(nbytes),
                wire_bytes=_ring_allreduce_bytes(nbytes, world),
            )
        self._add_stat(compress_s=time.perf_counter() - t0)
        return pending, send

    def _pack_sparse(self, pending: _Pending, flat_N: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        plan, total = pending.plan, pending.total
        layout = plan.layout
        device = total.device
        sparse = plan.sparse_entries
        if cfg.selection == "threshold":
            work = mask = None
            if device.type == "cpu":
                work = self._take(total)
                mask = self._take(total, torch.bool, -(-plan.numel // 8) * 8)
            segments = [(e.offset, e.numel, e.k, e.stride) for e in sparse]
            idx_real, counts = threshold_indices_segments(total, segments, offset=self.step, scratch=work,
                                                          mask_scratch=mask)
            self._give(work, mask)
        else:
            parts = [topk_indices(total[e.offset : e.offset + e.numel], e.k).add_(e.offset) for e in sparse]
            idx_real, counts = torch.cat(parts), [p.numel() for p in parts]
        sent = sum(counts)
        if sent < layout.n_sparse:  # an entry sent fewer than k: pad its slots with position 0, value 0
            slot = torch.cat([torch.arange(e.slot, e.slot + c, device=device) for e, c in zip(sparse, counts)])
            idx_msg = torch.zeros(layout.n_sparse, dtype=idx_real.dtype, device=device).index_put_((slot,), idx_real)
            pad = torch.ones(layout.n_sparse, dtype=torch.bool, device=device).index_fill_(0, slot, False)
            vals = total.index_select(0, idx_msg).masked_fill_(pad, 0.0)
        else:
            idx_msg = idx_real
            vals = total.index_select(0, idx_msg)
        wire, scales_E, sent_vals = encode_segments(
            vals, layout.value_dtype, plan.positions("slot_entry", device), layout.n_scales
        )
        dense_D = total.index_select(0, plan.positions("dense", device)) if layout.n_dense else total.new_zeros(0)
        if cfg.check_finite:  # a sum is cheaper than a mask and keeps any inf or nan
            finite = torch.isfinite(flat_N.sum(dtype=torch.float32))
        else:
            finite = torch.ones((), dtype=torch.bool, device=device)
        pending.idx_real, pending.idx_msg, pending.sent_msg = idx_real, idx_msg, sent_vals
        self._add_stat(sent=float(sent + layout.n_dense))
        return pack(layout, finite=finite, scales_E=scales_E, indices_K=idx_msg, values_K=wire, dense_D=dense_D)

    def _finish(
        self, pending: _Pending, received: torch.Tensor, world: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Turn the exchanged tensor into the averaged flat gradient (into ``out`` when it is a float32
        tensor of the bucket's size); commit once the step is complete."""
        plan = pending.plan
        cfg = self.config
        if pending.fast:
            pending.result = received
            self._complete(pending, None)
            return received
        if plan.sparse:
            finite_W, scales_WE, idx_WK, val_WK, dense_WD = unpack(received, plan.layout, world)
            if out is not None and out.dtype == torch.float32 and out.numel() == plan.numel:
                result = out.zero_()
            else:
                result = torch.zeros(plan.numel, dtype=torch.float32, device=received.device)
            if plan.layout.n_sparse:
                vals_WK = val_WK.float()
                if plan.layout.value_dtype == torch.float16:
                    vals_WK = vals_WK * scales_WE.index_select(1, plan.positions("slot_entry", received.device))
                for r in range(world):
                    result.index_add_(0, idx_WK[r].long(), vals_WK[r] / world)
            if plan.layout.n_dense:
                dense = dense_WD[0] / world
                for r in range(1, world):
                    dense = dense + dense_WD[r] / world
                result.index_copy_(0, plan.positions("dense", result.device), dense)
            ok = finite_W.all() if cfg.check_finite else None
            if ok is not None and (ok.device.type != "cpu" or not bool(ok)):
                result.masked_fill_(~ok, float("nan"))
        else:
            result = received.float()
            ok = torch.isfinite(result.sum()) if cfg.check_finite else None
            if out is not None and out.dtype == torch.float32 and out.numel() == plan.numel:
                result = out.copy_(result)
                self._give(pending.send)
        self._complete(pending, ok)
        return result

    def _commit(self, pending: _Pending, ok: torch.Tensor | None) -> None:
        cfg = self.config
        plan = pending.plan
        ratio = self._scale_ratio
        device = pending.total.device
        if pending.u_new is not None:
            u_new = pending.u_new
            if plan.sparse and cfg.momentum_masking:
                u_new.index_fill_(0, pending.idx_real, 0.0)
            kept = _keep_if(ok, u_new, pending.u_old, ratio)
            self._store(self.momenta, kept, plan.entries)
            self._give(*(t for t in (u_new, pending.u_old) if t is not kept))
        if not cfg.error_feedback or not plan.compressible:
            if pending.total is not pending.u_new:
                self._give(pending.total)
            return
        if plan.sparse:
            v_new = pending.total
            # what was not sent (or what rounding took off the sent values) stays behind
            v_new.index_add_(0, pending.idx_msg, pending.sent_msg, alpha=-1)
            v_new.index_fill_(0, plan.positions("dense", device), 0.0)
        elif pending.bf16_dense:
            total = pending.total
            v_new = total - (total / pending.world).to(torch.bfloat16).float() * pending.world
            v_new.index_fill_(0, plan.positions("fixed", device), 0.0)
        elif pending.v_old is not None:
            v_new = pending.total.zero_()  # flushed by the dense exchange
        else:
            if pending.total is not pending.u_new:
                self._give(pending.total)
            return
        kept = _keep_if(ok, v_new, pending.v_old, ratio)
        self._store(self.residuals, kept, plan.compressible)
        self._give(*(t for t in (v_new, pending.v_old, pending.total) if t is not kept and t is not pending.u_new))


def _keep_if(
    ok: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor | None, ratio: torch.Tensor | None
) -> torch.Tensor:
    """``new`` where the step was finite, else the old state (rescaled to the current loss scale)."""
    if ok is None:
        return new
    if ok.device.type == "cpu":  # reading the flag costs nothing on the CPU: skip the masked copy
        if bool(ok):
            return new
        return torch.zeros_like(new) if old is None else (old * ratio if ratio is not None else old)
    if old is None:
        return new.masked_fill_(~ok, 0.0)
    old = old.to(new.device)
    if ratio is not None:
        old = old * ratio
    return torch.where(ok, new, old)


def _ring_allreduce_bytes(nbytes: int, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``."""
    return 2.0 * (world - 1) / world * nbytes


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
    return gather(out, inp, group=group, async_op=True)


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook for Deep Gradient Compression (see the module docstring).

    Dense steps all-reduce the bucket (exactly ``allreduce_hook`` when there is no state
    to carry); sparse steps all-gather one packed message per rank
    (:mod:`sparsetrain.compression.wire`) and decode it with ``index_add_`` in rank order,
    so every rank computes bit-identical gradients.

    Args:
        state: the :class:`DGCState`.
        bucket: DDP's gradient bucket.

    Returns:
        A future holding the averaged flat gradient of the bucket.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    params = list(bucket.parameters())
    pending, send = state._prepare(buffer, params, world)
    if pending.plan.sparse:
        out = torch.empty(world * send.numel(), dtype=torch.uint8, device=send.device)
        fut = _all_gather(out, send, group).get_future()
    else:
        out = send
        fut = dist.all_reduce(send, group=group, async_op=True).get_future()
    if bucket.is_last():
        state._end_step()

    def finish(_: torch.futures.Future) -> torch.Tensor:
        result = state._finish(pending, out, world, out=buffer)
        if result is not buffer:
            buffer.copy_(result)
        return buffer

    return fut.then(finish)


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
        warnings.warn(
            f"momentum correction (momentum={cfg.momentum}) assumes plain SGD; "
            f"{type(optimizer).__name__} adds its own moment estimates on top",
            stacklevel=2,
        )
