"""The DGC compression engine: one rank's residuals, momenta and statistics, and the algorithm.

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
  plain SGD (no momentum of its own: the engine owns it).

Tensors with fewer than 2 dimensions or fewer than ``min_numel`` elements, every tensor
during the dense warm-up, and tensors for which the cost rule finds a dense all-reduce
cheaper are sent whole: ``a + v`` is all-reduced (the residual is flushed, ``v <- 0``) and
``u`` is not masked, so a dense step is exactly momentum SGD (:mod:`.plan` decides).

:class:`CompressionEngine` is what every exchange drives (the DDP hook
:func:`~sparsetrain.compression.dgc_hook`, the Horovod optimizer, the sparse exchange), one flat
buffer ("bucket") at a time::

    msg = engine.compress(flat, layout, world)     # this rank's message: msg.send, msg.collective
    received = <msg.collective>(msg.send)          # all_gather (sparse) or all_reduce with sum (dense)
    averaged = engine.decompress(msg, received)    # the averaged flat gradient
    ...                                            # every bucket of the step compressed:
    engine.end_step()                              # the step is committed once every bucket is decompressed

The state is per parameter name, not per bucket, so a change in how tensors are grouped into
buckets (DDP rebuilds its buckets after the first iteration and on every restart) does not
disturb it. Nothing is committed to the state before every bucket of the step has been exchanged
and every rank's gradient was finite (AMP safety). When ``model`` is given, the state follows the
gradient masks of the components attached to it (rule 3 of ``docs/architecture.md``).

Legend: N elements of a bucket, K sparse slots of a bucket, W ranks.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import contract
from ._loss_scale import current_scale
from .plan import BucketLayout, DGCConfig, Plan, PlanEntry, plan_bucket
from .topk import threshold_indices_segments, topk_indices
from .wire import encode_segments, pack, unpack

__all__ = ["CompressionEngine", "Message"]

_TOTALS = ("payload_bytes", "dense_payload_bytes", "wire_bytes", "dense_wire_bytes", "compress_s")


@dataclass
class Message:
    """One bucket's message: what to exchange, and what the engine needs to decompress and commit it.

    Attributes:
        send: the tensor this rank contributes: a ``uint8`` segment
            (:mod:`sparsetrain.compression.wire`) to all-gather when ``collective`` is
            ``"all_gather"``, else a float tensor of the bucket's size, already divided by W, to
            all-reduce with a sum.
        plan: how the bucket is exchanged (:class:`~sparsetrain.compression.plan.Plan`).

    The other fields are what the engine computed before the exchange and commits after it; only
    the engine reads them.
    """

    plan: Plan
    send: torch.Tensor | None = None
    world: int = 1
    fast: bool = False
    bf16_dense: bool = False
    u_old: torch.Tensor | None = None
    u_new: torch.Tensor | None = None
    v_old: torch.Tensor | None = None
    total: torch.Tensor | None = None
    idx_real: torch.Tensor | None = None  # positions sent (no padding)
    idx_msg: torch.Tensor | None = None  # message slots (padding: position 0, value 0)
    sent_msg: torch.Tensor | None = None  # the values as the receivers decode them, per slot
    result: torch.Tensor | None = None

    @property
    def collective(self) -> Literal["all_gather", "all_reduce"]:
        """``"all_gather"`` for a sparse message, ``"all_reduce"`` (sum) for a dense one."""
        return "all_gather" if self.plan.sparse else "all_reduce"

    @property
    def commits(self) -> bool:
        return not self.fast


class CompressionEngine:
    """One rank's DGC state (keyed by parameter name) and the algorithm that updates it.

    Args:
        config: the options.
        grad_scaler: a ``torch.amp.GradScaler`` whose loss scale the gradients carry; the
            residuals and momenta are rescaled whenever the scale changes, and the clip
            threshold follows it.
        model: the model whose parameters the state keys by name; the residuals and momenta
            are then kept zero outside the gradient masks of the components attached to it
            (``contract.gradient_masks``).

    Attributes:
        step_count: synced steps taken (:meth:`end_step` counts).
        residuals: parameter name -> this rank's unsent accumulated gradient (flat, float32).
        momenta: parameter name -> this rank's momentum ``u`` (flat, float32).
        last_stats: statistics of the last step; ``totals``: their sums over the run.

    The tensors in ``residuals`` and ``momenta`` are replaced every step, and their memory is
    reused for later steps: clone them (or use :meth:`state_dict`) to keep a copy.
    """

    def __init__(self, config: DGCConfig, *, grad_scaler: Any = None, model: nn.Module | None = None) -> None:
        if not isinstance(config, DGCConfig):
            raise TypeError(f"`config` must be a DGCConfig, got {type(config).__name__}")
        # hyperparameters
        self.config = config
        self.grad_scaler = grad_scaler
        self.model = model
        # internal state
        self.step_count = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self.momenta: dict[str, torch.Tensor] = {}
        self.loss_scale: torch.Tensor | None = None
        self._mask_version: tuple[int, ...] | None = None
        self._plans: dict[tuple, Plan] = {}
        self._lock = threading.Lock()
        self._step_open = False
        self._scale_ratio: torch.Tensor | None = None
        self._scale_now: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None
        self._n_prepared = 0
        self._expected: int | None = None
        self._done: list[tuple[Message, torch.Tensor | None]] = []
        self._pool: dict[tuple[int, torch.device, torch.dtype], list[torch.Tensor]] = {}
        # statistics
        self.last_stats: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self._acc: dict[str, float] = {}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: step, loss scale, residuals, momenta, totals (copies)."""
        return {
            "step": self.step_count,
            "loss_scale": None if self.loss_scale is None else float(self.loss_scale),
            "residuals": {k: v.detach().clone() for k, v in self.residuals.items()},
            "momenta": {k: v.detach().clone() for k, v in self.momenta.items()},
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (tensors move to the gradients' device at first use)."""
        self.step_count = int(state["step"])
        ls = state.get("loss_scale")
        self.loss_scale = None if ls is None else torch.tensor(float(ls))
        self.residuals = {k: v.detach().clone() for k, v in state["residuals"].items()}
        self.momenta = {k: v.detach().clone() for k, v in state["momenta"].items()}
        self.totals = dict(state.get("totals", {}))
        self._plans.clear()
        self._mask_version = None  # the loaded state is cleared outside the masks at the next step

    _TRANSIENT = ("grad_scaler", "model", "_mask_version", "_plans", "_lock", "_done", "_expected", "_n_prepared",
                  "_pool")

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the GradScaler, the model, cached plans, buffers and the step in flight."""
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.grad_scaler, self.model, self._mask_version = None, None, None
        self._plans, self._lock, self._pool = {}, threading.Lock(), {}
        self._done, self._expected, self._n_prepared = [], None, 0

    def reset_plans(self) -> None:
        """Forget the cached plans (after the parameter names changed)."""
        self._plans.clear()
        self._mask_version = None

    @property
    def nonfinite_steps(self) -> int:
        """Steps whose state update was skipped because some rank's gradient was not finite (synchronises)."""
        return 0 if self._nonfinite is None else int(self._nonfinite)

    def _add_stat(self, **values: float) -> None:
        for k, v in values.items():
            self._acc[k] = self._acc.get(k, 0.0) + v

    def end_step(self) -> None:
        """Every bucket of this step was compressed: count the step; it commits once every message is decompressed."""
        acc = self._acc
        total = acc.get("elements", 0.0)
        stats = {
            "step": float(self.step_count),
            "density": self.config.density_at(self.step_count),
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
        for k in _TOTALS:
            self.totals[k] = self.totals.get(k, 0.0) + stats[k]
        self.totals["steps"] = self.totals.get("steps", 0.0) + 1
        self._acc = {}
        self._step_open = False
        self.step_count += 1
        with self._lock:
            self._expected, self._n_prepared = self._n_prepared, 0
            done = self._take_done()
        if done:
            self._commit_step(done)

    def _take_done(self) -> list[tuple[Message, torch.Tensor | None]] | None:
        """Under the lock: the step's finished buckets once all of them are in."""
        if self._expected is None or len(self._done) < self._expected:
            return None
        done, self._done, self._expected = self._done, [], None
        return done

    def _complete(self, pending: Message, ok: torch.Tensor | None) -> None:
        with self._lock:
            self._done.append((pending, ok))
            done = self._take_done()
        if done:
            self._commit_step(done)

    def _commit_step(self, done: list[tuple[Message, torch.Tensor | None]]) -> None:
        """Commit every bucket of a step, or none: a non-finite gradient anywhere skips the whole
        step's state update, as the GradScaler skips the whole optimizer step."""
        if not any(p.commits for p, _ in done):
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
            if p.commits:
                self._commit(p, ok)

    # ------------------------------------------------------------------ the algorithm

    def _plan(self, layout: BucketLayout, world: int) -> Plan:
        cfg = self.config
        step = self.step_count
        key = (layout, world, cfg.density_at(step), step < cfg.warmup_steps)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 256:
                self._plans.clear()
            plan = self._plans[key] = plan_bucket(layout, cfg, world, step)
        return plan

    def follow_masks(self) -> None:
        """Rule 3 of ``docs/architecture.md``: never emit gradient outside the current gradient masks.

        When the masks of the components that mask gradients (``contract.gradient_masks``) have
        changed since the last step, the residuals and momenta are zeroed outside them, so that
        gradient accumulated at a position a mask update has just dropped is never sent. Afterwards
        the incoming gradients are zero there, and so the state stays zero there.
        """
        if self.model is None:
            return
        version, masks = contract.gradient_masks(self.model)
        if version == self._mask_version:
            return
        for table in (self.residuals, self.momenta):
            for name, t in table.items():
                mask = masks.get(name)
                if mask is None:  # an expert slice "<stack>.<e>" of a stacked parameter: its slice of the mask
                    stack, _, e = name.rpartition(".")
                    mask = masks.get(stack)
                    if mask is None or not e.isdigit() or mask.dim() < 2 or int(e) >= mask.shape[0]:
                        continue
                    mask = mask[int(e)]
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
        self.follow_masks()
        self._scale_ratio = None
        self._scale_now = None
        scaler = self.grad_scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return
        cur = current_scale(scaler, device)
        if self.loss_scale is not None:
            self._scale_ratio = cur / self.loss_scale.to(device)
        self._scale_now = cur.clone()
        self.loss_scale = self._scale_now

    def _flat_state(self, table: dict[str, torch.Tensor], plan: Plan, entries: list[PlanEntry],
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
    def _zero_outside(base: torch.Tensor, plan: Plan, entries: list[PlanEntry]) -> bool:
        # residual flats are kept zero outside the compressible tensors by _commit
        return entries == plan.compressible

    @staticmethod
    def _store(table: dict[str, torch.Tensor], flat: torch.Tensor, entries: list[PlanEntry]) -> None:
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

    def compress(self, flat_N: torch.Tensor, layout: BucketLayout, world: int) -> Message:
        """Compute this rank's message for one bucket (the first bucket of a step opens the step).

        Args:
            flat_N: the bucket's flat local gradient (any float dtype); read, and on the plain
                dense path (nothing to carry) divided by ``world`` in place and sent as is.
            layout: the names and shapes of the tensors in ``flat_N``, in order.
            world: W, the number of ranks exchanging.

        Returns:
            The :class:`Message`: exchange ``message.send`` with ``message.collective``, then
            :meth:`decompress`.
        """
        t0 = time.perf_counter()
        cfg = self.config
        if not self._step_open:
            self._begin_step(flat_N.device)
        self._n_prepared += 1
        if layout.numel != flat_N.numel():
            raise ValueError(f"`layout` describes {layout.numel} elements, `flat_N` has {flat_N.numel()}")
        plan = self._plan(layout, world)
        ratio = self._scale_ratio
        bf16_dense = cfg.fallback_dtype == "bf16" and self.step_count >= cfg.warmup_steps and not plan.sparse
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
        pending = Message(plan, fast=False, world=world, bf16_dense=bf16_dense, u_old=u_old, v_old=v_old)
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
            pending.send = flat_N.div_(world)
            return pending

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
            send = pending.send = self._pack_sparse(pending, flat_N)
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
        return pending

    def _pack_sparse(self, pending: Message, flat_N: torch.Tensor) -> torch.Tensor:
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
            idx_real, counts = threshold_indices_segments(total, segments, offset=self.step_count, scratch=work,
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

    def decompress(self, message: Message, received: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The averaged flat gradient of one bucket from what the exchange returned.

        Args:
            message: what :meth:`compress` returned for this bucket.
            received: the all-gathered ``uint8`` segments of every rank (in rank order), or the
                all-reduced sum.
            out: written into when it is a float32 tensor of the bucket's size.

        Returns:
            The averaged gradient (float32, or the bucket's own tensor on the plain dense path).
            Once :meth:`end_step` was called and every message of the step is decompressed, the
            step's state is committed (or, when any rank's gradient was not finite, left as it was).
        """
        pending, world = message, message.world
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

    def _commit(self, pending: Message, ok: torch.Tensor | None) -> None:
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
