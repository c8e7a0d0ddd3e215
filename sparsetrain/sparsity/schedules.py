"""When masks change, and by how much: drop-fraction decay and the gradual-pruning ramp.

Steps count optimizer steps; step ``t`` is the state right after the ``t``-th optimizer step
(``t >= 1``), which is when a mask update runs.

- RigL / SET drop fraction (Evci et al. 2020, Eq. 1; cosine annealing)::

      f(t) = alpha / 2 * (1 + cos(pi * (t - t0) / (t_end - t0)))

  or the constant ``alpha`` (SET's original zeta; the rigl reference's default anneal).
- Gradual magnitude pruning sparsity (Zhu & Gupta 2017, Eq. 1)::

      s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3     for t0 <= t <= t_end

  applied every ``dt`` steps from ``t0`` and once more at ``t_end`` so the final sparsity is
  always reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DROP_SCHEDULES", "METHODS", "MaskSchedule", "cosine_drop_fraction", "gmp_sparsity"]

METHODS = ("rigl", "set", "gmp", "static", "topkast")
DROP_SCHEDULES = ("cosine", "constant")


def cosine_drop_fraction(step: int, *, initial: float, begin_step: int, end_step: int) -> float:
    """RigL's cosine-annealed drop fraction ``alpha/2 * (1 + cos(pi * (t - t0) / (t_end - t0)))``.

    Returns ``initial`` before ``begin_step`` and 0 from ``end_step`` on.
    """
    if step <= begin_step:
        return float(initial)
    if step >= end_step:
        return 0.0
    return 0.5 * initial * (1.0 + math.cos(math.pi * (step - begin_step) / (end_step - begin_step)))


def gmp_sparsity(step: int, *, final: float, initial: float = 0.0, begin_step: int, end_step: int) -> float:
    """Zhu & Gupta's cubic ramp ``s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3``.

    Returns ``initial`` before ``begin_step`` and ``final`` from ``end_step`` on.
    """
    if step <= begin_step:
        return float(initial)
    if step >= end_step:
        return float(final)
    progress = (step - begin_step) / (end_step - begin_step)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(kw_only=True, frozen=True)
class MaskSchedule:
    """The resolved schedule of one run: which optimizer steps update masks, and how.

    Args:
        method: ``"rigl"``, ``"set"``, ``"gmp"``, ``"static"`` or ``"topkast"`` (sets re-chosen like
            RigL/SET's updates: every ``update_interval`` steps while ``t < end_step``).
        sparsity: final global sparsity, in [0, 1).
        total_steps: optimizer steps in the whole run (>= 1).
        update_interval: ``dT``, steps between mask updates (>= 1).
        begin_step: ``t0``; updates happen at ``t0 + k * dT`` (``k >= 1``; for gmp ``k >= 0``).
        end_step: ``t_end``; RigL/SET update only while ``t < t_end``; gmp reaches ``sparsity``
            at ``t_end``; masks are frozen afterwards.
        drop_fraction: ``alpha``, the RigL/SET drop fraction at ``t0``, in [0, 1].
        drop_schedule: ``"cosine"`` (paper) or ``"constant"``.
    """

    method: str
    sparsity: float
    total_steps: int
    update_interval: int
    begin_step: int
    end_step: int
    drop_fraction: float = 0.3
    drop_schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {self.total_steps!r}")
        if self.update_interval < 1:
            raise ValueError(f"`update_interval` must be >= 1, got {self.update_interval!r}")
        if not 0 <= self.begin_step < self.end_step:
            raise ValueError(
                f"`begin_step` must be in [0, end_step={self.end_step}), got {self.begin_step!r}"
            )
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"`drop_fraction` must be in [0, 1], got {self.drop_fraction!r}")
        if self.drop_schedule not in DROP_SCHEDULES:
            raise ValueError(f"`drop_schedule` must be one of {', '.join(DROP_SCHEDULES)}, got {self.drop_schedule!r}")

    @classmethod
    def from_fractions(
        cls,
        *,
        method: str,
        sparsity: float,
        total_steps: int,
        update_interval: int,
        begin_fraction: float = 0.0,
        end_fraction: float = 0.75,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
    ) -> MaskSchedule:
        """Resolve ``begin_fraction`` / ``end_fraction`` of ``total_steps`` into steps.

        ``end_step = max(1, round(end_fraction * total_steps))`` and
        ``begin_step = min(round(begin_fraction * total_steps), end_step - 1)``.
        """
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"`total_steps` must be an int >= 1, got {total_steps!r}")
        if not 0.0 < end_fraction <= 1.0:
            raise ValueError(f"`end_fraction` must be in (0, 1], got {end_fraction!r}")
        if not 0.0 <= begin_fraction < end_fraction:
            raise ValueError(f"`begin_fraction` must be in [0, end_fraction={end_fraction}), got {begin_fraction!r}")
        end_step = max(1, round(end_fraction * total_steps))
        begin_step = min(round(begin_fraction * total_steps), end_step - 1)
        return cls(
            method=method, sparsity=sparsity, total_steps=total_steps, update_interval=update_interval,
            begin_step=begin_step, end_step=end_step, drop_fraction=drop_fraction, drop_schedule=drop_schedule,
        )

    def is_update_step(self, step: int) -> bool:
        """Whether masks change right after optimizer step ``step``."""
        if self.method == "static" or step < self.begin_step:
            return False
        since = step - self.begin_step
        if self.method == "gmp":
            return step <= self.end_step and (since % self.update_interval == 0 or step == self.end_step)
        return since > 0 and since % self.update_interval == 0 and step < self.end_step

    def needs_gradient(self, step: int) -> bool:
        """Whether the update after ``step`` needs the dense gradient of that step (RigL only)."""
        return self.method == "rigl" and self.is_update_step(step)

    def drop_fraction_at(self, step: int) -> float:
        """RigL/SET drop fraction used by the update after ``step``."""
        if self.drop_schedule == "constant":
            return float(self.drop_fraction) if step < self.end_step else 0.0
        return cosine_drop_fraction(step, initial=self.drop_fraction, begin_step=self.begin_step,
                                    end_step=self.end_step)

    def sparsity_at(self, step: int) -> float:
        """Target global sparsity after the update at ``step`` (gmp ramps; the others are constant)."""
        if self.method != "gmp":
            return float(self.sparsity)
        return gmp_sparsity(step, final=self.sparsity, begin_step=self.begin_step, end_step=self.end_step)

    def update_steps(self) -> list[int]:
        """Every step after which masks change, in order (for inspection and tests)."""
        return [t for t in range(1, self.total_steps + 1) if self.is_update_step(t)]

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints."""
        return {
            "method": self.method, "sparsity": float(self.sparsity), "total_steps": int(self.total_steps),
            "update_interval": int(self.update_interval), "begin_step": int(self.begin_step),
            "end_step": int(self.end_step), "drop_fraction": float(self.drop_fraction),
            "drop_schedule": self.drop_schedule,
        }
