"""Dynamic sparsity under a DeepSpeed engine: mask the fp32 master weights too (ZeRO stages 0-2).

A ZeRO optimizer keeps its own fp32 copy of every weight ("master weights", partitioned over
ranks in stages 1 and 2) together with the Adam moments of that copy, and after each step it
copies the master weights back into the module's parameters. Masking the module parameters
alone is therefore not enough: a weight zeroed in the module (at attach time or when a mask
update drops it) would come back from its master copy at the next step. :class:`DeepSpeedSparsity`
registers a state masker with the :class:`~sparsetrain.sparsity.DynamicSparsifier` that zeroes,
on each rank, the fragment of the master weight and of every optimizer state that rank owns,
using DeepSpeed's low-/high-precision fragment mapping (``param._hp_mapping``, the mapping
behind ``deepspeed.utils.safe_get_local_fp32_param``).

Usage from a plain loop::

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    sparsifier = DynamicSparsifier(engine.module, DynamicSparsityConfig(method="rigl", sparsity=0.9),
                                   total_steps=total_optimizer_steps)
    ds = DeepSpeedSparsity(sparsifier, engine)
    for batch in loader:
        engine.backward(loss_fn(engine(batch)))
        engine.step()
        ds.step()          # counts only steps DeepSpeed applied (accumulation boundaries, no overflow)

Nothing here imports DeepSpeed; ZeRO stage 3 (parameters partitioned too) is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..contract import mask_
from .dynamic import DynamicSparsifier

__all__ = ["DeepSpeedSparsity", "mask_master_weights"]


@torch.no_grad()
def mask_master_weights(pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> int:
    """Zero, outside each mask, this rank's fragment of the master weight and its optimizer states.

    Args:
        pairs: ``(module parameter, bool mask)`` pairs; parameters without a DeepSpeed
            ``_hp_mapping`` (or whose mapping holds no fragment on this rank) are skipped.

    Returns:
        The number of parameters that had a fragment on this rank.
    """
    done = 0
    for weight, mask in pairs:
        mapping = getattr(weight, "_hp_mapping", None)
        if mapping is None:
            continue
        address = mapping.lp_fragment_address
        hp = mapping.hp_fragment
        local = mask.flatten().narrow(0, address.start, address.numel).to(hp.device)
        mask_(hp, local)
        for state in (getattr(mapping, "optim_fragment", None) or {}).values():
            if isinstance(state, torch.Tensor) and state.shape == hp.shape:
                mask_(state, local)
        done += 1
    return done


class DeepSpeedSparsity:
    """Drive a :class:`DynamicSparsifier` from a DeepSpeed engine and keep its master weights masked.

    Args:
        sparsifier: the sparsifier, attached to ``engine.module`` (or a submodule of it), with
            no optimizer attached (the engine's optimizer is handled here).
        engine: a ``deepspeed.DeepSpeedEngine`` with ZeRO stage 0, 1 or 2.

    Raises:
        ValueError: ZeRO stage 3, or a sparsifier whose model is not part of ``engine.module``.
    """

    def __init__(self, sparsifier: DynamicSparsifier, engine: Any) -> None:
        stage = int(engine.zero_optimization_stage())
        if stage >= 3:
            raise ValueError(f"ZeRO stage must be 0, 1 or 2 for dynamic sparsity, got {stage}")
        if all(sparsifier.model is not m for m in engine.module.modules()):
            raise ValueError("`sparsifier` must be attached to `engine.module` (or one of its submodules)")
        self.sparsifier = sparsifier
        self.engine = engine
        self.stage = stage
        has_master = any(getattr(w, "_hp_mapping", None) is not None for w, _ in sparsifier._pairs())
        basic = getattr(engine, "optimizer", None)
        if not has_master and isinstance(basic, torch.optim.Optimizer):
            # Stage 0 in fp32: the engine steps a plain torch optimizer on the module parameters.
            sparsifier.attach_optimizer(basic, hook=False)
        sparsifier.add_state_masker(mask_master_weights)
        self._applied = self._applied_steps()

    def _applied_steps(self) -> int:
        return int(self.engine.global_steps) - int(getattr(self.engine, "skipped_steps", 0))

    def step(self) -> None:
        """Call after every ``engine.step()``; advances the sparsifier once per applied optimizer step
        (the figures of the latest update are in ``sparsifier.statistics()``)."""
        applied = self._applied_steps()
        while self._applied < applied:
            self._applied += 1
            self.sparsifier.step()

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state (the engine step count is re-read on load)."""
        return self.sparsifier.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the sparsifier and re-synchronise with the engine's step count."""
        self.sparsifier.load_state_dict(state)
        self._applied = self._applied_steps()
