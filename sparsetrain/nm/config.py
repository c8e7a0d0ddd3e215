"""How to train with N:M sparsity: :class:`NMConfig`, validated when built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import contract
from .masks import check_nm
from .methods import METHODS, mdgf_beta, sdgf_ladder, sdgf_pattern

__all__ = ["NMConfig"]


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
