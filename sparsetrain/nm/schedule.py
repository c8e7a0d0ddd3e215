"""Where an N:M sparsifier's schedule stands, and what follows from it at each optimizer step.

The formulas are pure functions in :mod:`sparsetrain.nm.methods` (:func:`~sparsetrain.nm.mdgf_beta`,
:func:`~sparsetrain.nm.sdgf_pattern`), read through :meth:`NMConfig.beta` and
:meth:`NMConfig.pattern`; :class:`NMSchedule` holds the state they are evaluated at: the step, the
pattern in force (SDGF walks a ladder of patterns, the other methods keep the target), and the
number of mask updates made (for ``verify_every``).
"""

from __future__ import annotations

from typing import Any

from .config import NMConfig

__all__ = ["NMSchedule"]


class NMSchedule:
    """The step, pattern and mask-update count of one sparsifier.

    Args:
        config: the sparsifier's config (``method``, ``n``/``m``, ``decay``, ``decay_steps``,
            ``stages``, ``update_every``).
    """

    __slots__ = ("config", "step", "pattern", "updates")

    def __init__(self, config: NMConfig) -> None:
        self.config = config
        self.step = 0  # optimizer steps taken
        self.pattern: tuple[int, int] | None = config.pattern(0)  # None: dense (SDGF's first stage)
        self.updates = 0  # mask updates made (every verify_every-th checks the ranks)

    def advance(self) -> bool:
        """Count one optimizer step; returns whether the pattern in force changed (SDGF)."""
        self.step += 1
        new = self.config.pattern(self.step)
        changed = new != self.pattern
        self.pattern = new
        return changed

    @property
    def due(self) -> bool:
        """Whether the masks are recomputed at this step by ``update_every`` (a pattern change
        recomputes them too)."""
        k = self.config.update_every
        return k > 0 and self.step % k == 0

    @property
    def beta(self) -> float:
        """MDGF's weight on pruned entries at this step (0 for the other methods)."""
        return self.config.beta(self.step)

    @property
    def at_target(self) -> bool:
        """Whether the pattern in force is the target ``n:m``."""
        return self.pattern == (self.config.n, self.config.m)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "updates": self.updates,
                "pattern": list(self.pattern) if self.pattern else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.updates = int(state["updates"])
        self.pattern = tuple(state["pattern"]) if state["pattern"] is not None else None
