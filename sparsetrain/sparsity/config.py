"""What to sparsify and how: :class:`DynamicSparsityConfig`, validated when built.

The run length is not part of it (:meth:`DynamicSparsityConfig.schedule` turns a config and a
number of optimizer steps into a :class:`~sparsetrain.sparsity.MaskSchedule`);
:class:`~sparsetrain.sparsity.DynamicSparsifier` and
:class:`~sparsetrain.sparsity.TopKastSparsifier` take one. :data:`MATH_FIELDS` names the fields
that change what is computed (a saved state with other values is refused on load).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from torch import nn

from .. import _warn
from ..contract import check_patterns
from .density import DISTRIBUTIONS
from .masks import DEFAULT_MODULE_TYPES
from .schedules import DROP_SCHEDULES, METHODS, MaskSchedule

__all__ = ["MATH_FIELDS", "DynamicSparsityConfig"]

#: Config fields that change what is computed: a state saved with another value is refused on load.
MATH_FIELDS = ("method", "sparsity", "distribution", "update_every", "drop_fraction", "drop_schedule",
               "begin_fraction", "end_fraction", "include", "exclude", "keep_first_dense", "keep_last_dense", "seed")


@dataclass(kw_only=True)
class DynamicSparsityConfig:
    """What to sparsify and how (everything but the run length).

    Args:
        method: ``"rigl"`` (Evci et al. 2020), ``"set"`` (Mocanu et al. 2018), ``"gmp"``
            (dense-to-sparse, Zhu & Gupta 2017), ``"static"`` (random mask at init, fixed) or
            ``"topkast"`` (Jayakumar et al. 2020, :mod:`.topkast`: forward set = the masks, a larger
            backward set, dense weights kept).
        sparsity: final fraction of zero weights over the sparsified layers, in [0, 1).
        distribution: how the sparsity is spread over layers: ``"erk"``, ``"er"`` or ``"uniform"``
            (see :func:`sparsetrain.sparsity.layer_densities`).
        update_every: optimizer steps between mask updates (``dT``), >= 1.
        drop_fraction: RigL/SET fraction of active weights replaced at the first update (``alpha``).
        drop_schedule: ``"cosine"`` decay of the drop fraction to 0 at ``end_fraction`` (paper)
            or ``"constant"``.
        begin_fraction: fraction of training before the first update (gmp: where pruning starts).
        end_fraction: fraction of training after which masks are frozen (gmp: where the final
            sparsity is reached), in (0, 1].
        include: module-name globs to sparsify (default: every Linear / Conv1d/2d/3d). Stacked MoE
            expert weights are selected by parameter name, only when a glob here matches it
            (``"*.experts.w1_EFD"``, ``"*.experts.w*"``): each expert slice is then masked as a layer of
            its own (:mod:`sparsetrain.sparsity.stacked`), at any expert-parallel size.
        exclude: module-name (or expert-stack parameter-name) globs to leave dense.
        keep_first_dense: leave the first selected module dense (modules only, not expert stacks).
        keep_last_dense: leave the last selected module dense (modules only).
        module_types: module classes that can be sparsified.
        seed: seed of the generator drawing random masks and SET growth (same on every rank).
        verify_every: compare a fingerprint of the masks across ranks (:meth:`DynamicSparsifier.check_ranks`)
            after every mask update and every ``verify_every`` optimizer steps (default 100: masks change
            only at updates, so the periodic check only guards against outside writes); 0: never.
        enforce_interval: when to zero weights and same-shape optimizer states outside the masks
            besides attach, mask updates and loads (where it always happens). ``"auto"``
            (default): never, when every attached optimizer is one of
            :data:`ZERO_PRESERVING_OPTIMIZERS` (whose update keeps those zeros exactly, because the
            gradient is masked before the optimizer sees it), the gradient hooks are in place and
            no state masker is registered; otherwise after every optimizer step. An int ``N >= 1``:
            after every N-th optimizer step, whatever the optimizer (1 is the safe choice for an
            optimizer that can move a weight whose gradient and state are zero).
        grad_masking: where gradients are masked. ``"hook"`` (default): a gradient hook per
            sparsified weight, so everything that reads gradients (DDP and its communication
            hooks, gradient clipping, DeepSpeed) sees masked ones. ``"step"``: one pass over all
            of them just before each attached optimizer's step (an ``optimizer.register_step_pre_hook``
            calling :meth:`DynamicSparsifier.mask_gradients`), which saves the per-layer hook calls
            that dominate small steps. Then DDP reduces, and communication hooks see, unmasked
            gradients (do not combine it with gradient compression or DeepSpeed); gradient clipping
            must come after :meth:`DynamicSparsifier.mask_gradients` (the Lightning callback calls it
            before clipping); RigL's dense gradient is taken as the optimizer would see it (after
            DDP's averaging) instead of being all-reduced by the sparsifier.
        backward_extra: Top-KAST's ``M``: the backward set of a layer holds ``floor(M * numel)`` more
            weights than its forward set (the mask), in (0, 1 - forward density]; other methods ignore it.
        exploration_penalty: Top-KAST's L2 scale ``lambda`` of the exploration penalty (``lambda * W``
            added to the gradient on the forward set, ``lambda * W / D`` on the rest of the backward
            set), >= 0; other methods ignore it.
        update_interval: deprecated spelling of ``update_every`` (a ``FutureWarning``).
        check_sync: deprecated: ``verify_every=100`` (``True``) or ``0`` (``False``), with a ``FutureWarning``.
    """

    method: str = "rigl"
    sparsity: float = 0.8
    distribution: str = "erk"
    update_every: int = 100
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
    verify_every: int = 100
    enforce_interval: int | str = "auto"
    grad_masking: str = "hook"
    backward_extra: float = 0.1
    exploration_penalty: float = 1e-4
    # deprecated spellings, accepted with a FutureWarning (and still readable as properties)
    update_interval: InitVar[int | None] = None
    check_sync: InitVar[bool | None] = None

    def __post_init__(self, update_interval: int | None, check_sync: bool | None) -> None:
        every_arg = "update_every"
        if update_interval is not None:
            _warn.warn("`update_interval` is deprecated: use `update_every`", FutureWarning, stacklevel=3)
            self.update_every, every_arg = update_interval, "update_interval"
        if check_sync is not None:
            _warn.warn("`check_sync` is deprecated: use `verify_every` (True -> 100, False -> 0)", FutureWarning,
                          stacklevel=3)
            if not isinstance(check_sync, bool):
                raise ValueError(f"`check_sync` must be a bool, got {check_sync!r}")
            self.verify_every = 100 if check_sync else 0
        if self.grad_masking not in ("hook", "step"):
            raise ValueError(f"`grad_masking` must be 'hook' or 'step', got {self.grad_masking!r}")
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"`distribution` must be one of {', '.join(DISTRIBUTIONS)}, got {self.distribution!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"`{every_arg}` must be an int >= 1, got {self.update_every!r}")
        if isinstance(self.verify_every, bool) or not isinstance(self.verify_every, int) or self.verify_every < 0:
            raise ValueError(f"`verify_every` must be an int >= 0, got {self.verify_every!r}")
        for name in ("drop_fraction", "begin_fraction", "end_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"`{name}` must be a finite number, got {value!r} ({type(value).__name__})")
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
        self.include = check_patterns(self.include, "include")
        self.exclude = check_patterns(self.exclude, "exclude") or ()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"`seed` must be an int, got {self.seed!r}")
        for name in ("keep_first_dense", "keep_last_dense"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool (True or False), got {getattr(self, name)!r}")
        if self.enforce_interval != "auto" and (
            isinstance(self.enforce_interval, bool) or not isinstance(self.enforce_interval, int)
            or self.enforce_interval < 1
        ):
            raise ValueError(f"`enforce_interval` must be 'auto' or an int >= 1, got {self.enforce_interval!r}")
        from .topkast import check_topkast_fields

        check_topkast_fields(self)

    def schedule(self, total_steps: int) -> MaskSchedule:
        """The schedule of a run of ``total_steps`` optimizer steps."""
        return MaskSchedule.from_fractions(
            method=self.method, sparsity=float(self.sparsity), total_steps=total_steps,
            update_interval=self.update_every, begin_fraction=self.begin_fraction,
            end_fraction=self.end_fraction, drop_fraction=self.drop_fraction, drop_schedule=self.drop_schedule,
        )


def _deprecated_alias(old: str, new: str, to_new: Callable[[Any], Any], to_old: Callable[[Any], Any]) -> property:
    def get(self: Any) -> Any:
        return to_old(getattr(self, new))

    def set_(self: Any, value: Any) -> None:
        _warn.warn(f"`{old}` is deprecated: use `{new}`", FutureWarning, stacklevel=2)
        setattr(self, new, to_new(value))

    return property(get, set_, doc=f"Deprecated alias of ``{new}``.")


# The InitVars' defaults are already in the generated __init__; reading the old names goes through these.
DynamicSparsityConfig.update_interval = _deprecated_alias(  # type: ignore[assignment]
    "update_interval", "update_every", int, int)
DynamicSparsityConfig.check_sync = _deprecated_alias(  # type: ignore[assignment]
    "check_sync", "verify_every", lambda v: 100 if v else 0, lambda v: v > 0)
