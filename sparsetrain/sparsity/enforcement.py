"""When the masks must be re-applied to weights and optimizer states: the optimizers that keep zeros zero.

The sparsifier keeps every sparsified weight and each optimizer state of the weight's shape exactly
zero outside its mask. A full pass (:meth:`~sparsetrain.sparsity.DynamicSparsifier.apply_masks`)
zeroes them at attach, after every mask update and after every load. Between those points the pass
is redundant when every attached optimizer provably maps (weight 0, states 0, gradient 0) to
(weight 0, states 0) -- the gradient hook makes the gradient 0 outside the mask -- so by induction
over the steps the zeros stay zeros. This module holds that proof per optimizer
(:data:`ZERO_PRESERVING_OPTIMIZERS` and the condition each needs on its param groups) and the auto
rule built on it (:func:`optimizer_blocker`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["ZERO_PRESERVING_OPTIMIZERS", "optimizer_blocker"]


def _eps_positive(group: dict[str, Any]) -> str | None:
    eps = group.get("eps")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0:
        return None
    return f"eps={eps!r} (0 / 0 outside the mask)"


def _adagrad_ok(group: dict[str, Any]) -> str | None:
    init = group.get("initial_accumulator_value", 0)
    if init != 0:
        return f"initial_accumulator_value={init!r} (its `sum` state starts nonzero outside the mask)"
    return _eps_positive(group)


# Optimizers (these exact classes: a subclass may change `step`) whose update maps (weight 0, every
# state 0, gradient 0) to (weight 0, every state 0) exactly, with any of their options (weight decay
# coupled or decoupled, momentum, dampening, nesterov, amsgrad, centered, maximize, foreach, fused,
# capturable, differentiable), given finite hyperparameters and the condition checked here on every
# param group. From the step functions of torch/optim (single-tensor, foreach and fused alike), with
# g = 0 (the gradient hook), w = 0 and the states 0 at a masked position:
#   SGD       d = g + wd*w = 0; buf = mom*buf + (1 - damp)*d = 0 (first step buf = d); nesterov d + mom*buf = 0;
#             w -= lr*d = 0.
#   Adam(W)   g + wd*w = 0, or w *= 1 - lr*wd; m = lerp(m, g, 1 - b1) = 0; v = b2*v + (1 - b2)*g*g = 0;
#             amsgrad vmax = max(vmax, v) = 0; w -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = 0 / eps = 0.
#   NAdam     m, v as Adam; w -= c1*g/(sqrt(v/bc2) + eps) + c2*m/(sqrt(v/bc2) + eps) = 0.
#   RAdam     m, v as Adam; w -= lr*m/bc1 * (rect*sqrt(bc2)/(sqrt(v) + eps), or 1) = 0.
#   RMSprop   v = a*v + (1 - a)*g*g = 0; centered gavg = lerp(gavg, g, 1 - a) = 0; avg = sqrt(v - gavg^2) + eps
#             = eps; buf = mom*buf + g/avg = 0; w -= lr*buf (or lr*g/avg) = 0.
#   Adadelta  v = rho*v + (1 - rho)*g*g = 0; delta = sqrt(u + eps)/sqrt(v + eps)*g = 0;
#             u = rho*u + (1 - rho)*delta^2 = 0; w -= lr*delta = 0.
#   Adagrad   sum += g*g (stays at initial_accumulator_value, hence 0); w -= clr*g/(sqrt(sum) + eps) = 0.
#   ASGD      w = w*(1 - lambd*eta) - eta*(g + wd*w) = 0; ax += mu*(w - ax) (or ax = w) = 0.
# eps = 0 would make the Adam family, RMSprop, Adadelta and Adagrad compute 0 / 0 there. Not listed:
# Adamax (exp_inf = max(b2*exp_inf, |g| + eps) becomes eps outside the mask), Rprop (its step sizes start
# at lr), LBFGS, Adafactor, Muon, SparseAdam (not elementwise, or states of another shape) and anything
# else: those get the enforcement pass after every step.
_GROUP_CONDITIONS: dict[type[torch.optim.Optimizer], Callable[[dict[str, Any]], str | None] | None] = {
    torch.optim.SGD: None,
    torch.optim.Adam: _eps_positive,
    torch.optim.AdamW: _eps_positive,
    torch.optim.NAdam: _eps_positive,
    torch.optim.RAdam: _eps_positive,
    torch.optim.RMSprop: _eps_positive,
    torch.optim.Adadelta: _eps_positive,
    torch.optim.Adagrad: _adagrad_ok,
    torch.optim.ASGD: None,
}
#: The optimizer classes whose steps keep zero weights and states at zero when the gradient is zero
#: (``enforce_interval="auto"`` skips the per-step enforcement for them; Adagrad needs
#: ``initial_accumulator_value=0`` and all but SGD and ASGD need ``eps > 0``).
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = tuple(_GROUP_CONDITIONS)


def optimizer_blocker(optimizers: Sequence[torch.optim.Optimizer]) -> str | None:
    """Why these optimizers may move a zero weight or state, in words; ``None`` when every one of them
    is in :data:`ZERO_PRESERVING_OPTIMIZERS` and meets its condition on every param group.

    Cheap: called after every optimizer step in auto mode.
    """
    if not optimizers:
        return "no optimizer is attached"
    for opt in optimizers:
        cls = type(opt)
        if cls not in _GROUP_CONDITIONS:
            return f"{cls.__module__}.{cls.__qualname__} is not in ZERO_PRESERVING_OPTIMIZERS"
        condition = _GROUP_CONDITIONS[cls]
        if condition is not None:
            for group in opt.param_groups:
                reason = condition(group)
                if reason is not None:
                    return f"{cls.__name__} has {reason}"
    return None
