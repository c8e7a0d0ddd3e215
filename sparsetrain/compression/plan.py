"""What DGC sends, before anything is computed: the options, the density schedule, the cost rule.

:class:`DGCConfig` holds the hyperparameters of Deep Gradient Compression (Lin et al., ICLR 2018)
and the density schedule (dense warm-up, then the paper's ramp, Sec. 3.3). :func:`plan_bucket`
decides, for one flat buffer of tensors (a :class:`BucketLayout`) at one step, which tensors are
sent sparsely with how many values (the cost rule) and what the message looks like
(:class:`~sparsetrain.compression.wire.SegmentLayout`). A plan depends only on the layout, the
options, the number of ranks and the step, so it is the same on every rank.

Legend: N elements of a bucket, K sparse slots of a bucket, W ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .topk import num_selected, sample_stride
from .wire import DTYPES, SegmentLayout

__all__ = ["DENSITY_RAMP", "MATH_FIELDS", "BucketLayout", "DGCConfig", "Plan", "PlanEntry", "plan_bucket"]

#: DGC's warm-up densities (paper Sec. 3.3: sparsity 75%, 93.75%, 98.4375%, 99.6%), then the target.
DENSITY_RAMP = (0.25, 0.0625, 0.015625, 0.00390625)

#: The options that change what is computed: a checkpoint saved with other values is refused.
MATH_FIELDS = (
    "density", "warmup_steps", "ramp_steps", "momentum", "nesterov", "momentum_masking", "error_feedback",
    "clip_norm", "selection", "sample_ratio", "min_numel", "value_dtype", "cost_rule", "fallback_dtype",
)


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
        verify_every: check that every rank holds the same step count and options every this
            many optimizer steps (:meth:`DGCState.check_ranks`, from :meth:`DGCState.step`); 0: never.

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
    verify_every: int = 0

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
        _check_number("verify_every", self.verify_every, int)
        if self.verify_every < 0:
            raise ValueError(f"`verify_every` must be >= 0, got {self.verify_every}")

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


@dataclass(frozen=True)
class BucketLayout:
    """The tensors of one flat buffer, in order: their names (which key the state) and shapes.

    Args:
        names: parameter names (``"blocks.0.fc.weight"``), unique.
        shapes: the tensors' shapes; tensor ``i`` occupies ``prod(shapes[i])`` elements after
            tensor ``i - 1``.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError(f"`names` and `shapes` must have the same length, got {len(self.names)} and "
                             f"{len(self.shapes)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("`names` must be unique")

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]]) -> BucketLayout:
        """The layout of ``(name, tensor)`` pairs flattened one after another."""
        return cls(tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


@dataclass
class PlanEntry:
    """One tensor of a bucket in one step's plan."""

    key: str
    offset: int
    numel: int
    compressible: bool
    sparse: bool
    k: int = 0
    stride: int = 1
    slot: int = 0  # first sparse slot in the message


@dataclass
class Plan:
    """How one bucket (a fixed list of tensors) is exchanged at one density."""

    entries: list[PlanEntry]
    numel: int
    layout: SegmentLayout
    sparse: bool
    _index: dict[tuple[str, torch.device], torch.Tensor] = field(default_factory=dict)

    @property
    def sparse_entries(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.sparse]

    @property
    def compressible(self) -> list[PlanEntry]:
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


def plan_bucket(layout: BucketLayout, config: DGCConfig, world: int, step: int) -> Plan:
    """Decide how a bucket is sent at synced step ``step`` on ``world`` ranks.

    A tensor is compressible when it has at least 2 dimensions and ``min_numel`` elements. After
    the warm-up a compressible tensor of ``n`` elements is sent sparsely with ``k =
    num_selected(n, density)`` values, unless the cost rule prices it out (``W * k * (4 + value
    bytes) >= 2 * n * fallback bytes``: the all-gather would move more than a ring all-reduce).
    """
    warm = step < config.warmup_steps
    density = config.density_at(step)
    vb = torch.empty((), dtype=DTYPES[config.value_dtype]).element_size()
    fb = 4 if config.fallback_dtype == "fp32" else 2
    entries, offset, slot, n_dense = [], 0, 0, 0
    for key, shape in zip(layout.names, layout.shapes):
        n = math.prod(shape)
        compressible = len(shape) >= 2 and n >= config.min_numel
        e = PlanEntry(key=key, offset=offset, numel=n, compressible=compressible, sparse=False)
        if compressible and not warm:
            k = num_selected(n, density)
            if not config.cost_rule or world * k * (4 + vb) < 2 * n * fb:
                e.sparse, e.k, e.slot = True, k, slot
                e.stride = sample_stride(n, density, config.sample_ratio) if config.selection == "threshold" else 1
                slot += k
        if not e.sparse:
            n_dense += n
        entries.append(e)
        offset += n
    any_sparse = slot > 0
    n_scales = sum(e.sparse for e in entries)
    segment = SegmentLayout(slot, n_dense if any_sparse else 0, n_scales, DTYPES[config.value_dtype])
    return Plan(entries=entries, numel=offset, layout=segment, sparse=any_sparse)
