"""Top-KAST (Jayakumar et al., NeurIPS 2020): always-sparse training with two magnitude sets per layer.

Each sparsified layer keeps its dense parameters ``theta`` and two nested sets chosen by magnitude:

- the **forward set** ``A``: the ``D``-fraction of the layer's weights largest in ``|theta|`` (``D``,
  the layer's forward density, from ``sparsity`` and ``distribution`` exactly as for the other methods);
- the **backward set** ``B``: the ``D + M`` fraction largest in ``|theta|`` (``M`` =
  ``backward_extra``: ``floor(M * numel)`` more weights, at most the whole layer). ``B`` contains
  ``A`` because both are prefixes of one ranking (:mod:`sparsetrain.selection`: equal magnitudes,
  the lower flat index first).

The forward uses ``alpha = where(A, theta, 0)`` only. The gradient of the loss with respect to
``alpha`` is kept on ``B`` and thrown away elsewhere (never a dense gradient: what is exchanged,
compressed and applied is ``B``'s), and the optimizer moves ``theta`` on ``B`` only; ``theta``
outside ``B`` receives no update and keeps its value, so a weight can re-enter the sets later.

**Exploration penalty** (the paper's regulariser): an L2 penalty on ``alpha`` with the usual weight on
``A`` and ``1/D`` times that weight on ``B \\ A``, so that a weight outside the forward set must earn
its way in::

    penalty = lambda / 2 * ( sum_{i in A} theta_i**2  +  sum_{i in B \\ A} theta_i**2 / D )
    gradient:  lambda * theta_i on A,   lambda * theta_i / D on B \\ A,   0 outside B

(``lambda`` = ``exploration_penalty``; ``D`` the layer's forward density). The paper's equation
writes the per-weight term with ``|theta_i|`` (and ``|theta_i| / D``) while its text speaks of an
L2 penalty; the L2 form above is the one applied. The gradient term is added after the gradient
exchange, just before the optimizer step, so it is identical on every rank and never compressed.

**The sets** are re-chosen from ``|theta|`` after every ``update_every``-th optimizer step (from
``begin_fraction`` until ``end_fraction`` of training, like RigL's updates); a weight leaving ``B``
has its optimizer states zeroed, one entering ``B`` starts from zero states.

**How it is kept** (:class:`TopKastSparsifier`): beside each weight, three persistent buffers in the
model's state dict: ``weight_mask`` (``A``, what :meth:`~TopKastSparsifier.masks` returns, as for every
method), ``weight_backward_mask`` (``B``, what :meth:`~TopKastSparsifier.gradient_masks` returns and
hence what gradient compression and the masked exchange pack) and ``weight_dense`` (``theta``). The
parameter itself holds ``alpha`` (zero outside ``A``) everywhere the model can be run; only inside
``optimizer.step()`` does it hold ``theta`` on ``B``:

- optimizer step pre-hook (after the backward and any gradient clipping; with a closure, after the
  closure): ``W[B \\ A] = theta[B \\ A]``, then the penalty gradient is added;
- ``optimizer.step()`` updates ``W`` on ``B`` (its gradient and states are zero outside ``B``);
- :meth:`~TopKastSparsifier.step` (the step post-hook): ``theta[B] = W[B]``, ``W = where(A, W, 0)``,
  then the sets are re-chosen if due.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .. import contract
from ..selection import select_topk
from .density import floor_count
from .dynamic import MASK_NAME, MATH_FIELDS, DynamicSparsifier, DynamicSparsityConfig
from .update import host_ints

__all__ = [
    "BACKWARD_MASK_NAME",
    "DENSE_NAME",
    "TopKastSparsifier",
    "backward_counts",
    "check_topkast_fields",
    "exploration_penalty",
    "exploration_penalty_grad",
    "topkast_sets",
]

BACKWARD_MASK_NAME = "weight_backward_mask"
DENSE_NAME = "weight_dense"
#: Version of the ``"topkast"`` entry of the sparsifier's state dict.
_TOPKAST_STATE_VERSION = 1


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_topkast_fields(config: DynamicSparsityConfig) -> None:
    """Validate the Top-KAST fields of a config (``backward_extra`` = ``M``, ``exploration_penalty`` = ``lambda``).

    The ranges are checked for every method; their relation to ``sparsity`` only for ``"topkast"``.

    Raises:
        TypeError: a field is not a finite number.
        ValueError: naming the field, its value and the allowed range.
    """
    extra = _number(config.backward_extra, "backward_extra")
    penalty = _number(config.exploration_penalty, "exploration_penalty")
    if not 0.0 <= extra <= 1.0:
        raise ValueError(f"`backward_extra` must be in [0, 1] (Top-KAST's M, a fraction of each layer), got {extra!r}")
    if penalty < 0.0:
        raise ValueError(f"`exploration_penalty` must be >= 0 (Top-KAST's L2 scale lambda), got {penalty!r}")
    if config.method != "topkast":
        return
    density = 1.0 - float(config.sparsity)
    if config.sparsity == 0.0:
        raise ValueError("method='topkast' needs `sparsity` > 0 (the forward set is the top 1 - sparsity of each "
                         "layer), got sparsity=0.0")
    if extra <= 0.0:
        raise ValueError(f"method='topkast' needs `backward_extra` > 0 (M: the backward set is larger than the "
                         f"forward set; with M = 0 no weight outside the forward set is ever trained), got {extra!r}")
    if density + extra > 1.0 + 1e-9:
        raise ValueError(f"method='topkast': `backward_extra`={extra!r} with sparsity={config.sparsity!r} asks for a "
                         f"backward density D + M = {density + extra:.6g} > 1; use backward_extra <= "
                         f"{float(config.sparsity):.6g}")


def backward_counts(shapes: Mapping[str, tuple[int, ...]], forward: Mapping[str, int], extra: float) -> dict[str, int]:
    """Per layer, the size of the backward set: ``min(numel, forward + floor(extra * numel))``."""
    out = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        out[name] = min(numel, forward[name] + floor_count(extra * numel))
    return out


def topkast_sets(dense: torch.Tensor, forward_count: int, backward_count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward set ``A`` (``forward_count`` largest ``|dense|``) and the backward set ``B ⊇ A``
    (``backward_count`` largest), as bool masks of ``dense``'s shape.

    Ranking by :mod:`sparsetrain.selection` (equal magnitudes: the lower flat index first; NaN lowest),
    so the sets are the same on every rank and device, and ``A`` is a subset of ``B``.

    Raises:
        ValueError: counts outside ``0 <= forward_count <= backward_count <= numel``.
    """
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"`dense` must be a tensor, got {type(dense).__name__}")
    if not 0 <= forward_count <= backward_count <= dense.numel():
        raise ValueError(f"need 0 <= forward_count <= backward_count <= numel={dense.numel()}, got "
                         f"forward_count={forward_count}, backward_count={backward_count}")
    scores = dense.detach().abs()
    backward = select_topk(scores, backward_count)
    forward = select_topk(scores, forward_count, eligible=backward, n_eligible=backward_count)
    return forward, backward


def exploration_penalty_grad(weight: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, scale: float,
                             density: float) -> torch.Tensor:
    """The gradient of the exploration penalty: ``scale * W`` on ``A``, ``scale * W / density`` on
    ``B \\ A``, 0 outside ``B`` (NaN-safe there), as a new tensor."""
    on_b = torch.where(forward, weight, weight / density)
    return contract.masked(on_b, backward) * scale


def exploration_penalty(weight: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, scale: float,
                        density: float) -> torch.Tensor:
    """The penalty ``scale / 2 * (sum_A W**2 + sum_{B \\ A} W**2 / density)`` as a float64 scalar tensor."""
    w2 = weight.double().square()
    on_a = contract.masked(w2, forward).sum()
    rest = contract.masked(w2, backward & ~forward).sum()
    return scale / 2.0 * (on_a + rest / density)


class TopKastSparsifier(DynamicSparsifier):
    """``DynamicSparsifier(method="topkast")``: Top-KAST on the selected layers (see the module docstring).

    Constructed by :class:`~sparsetrain.sparsity.DynamicSparsifier` whenever the config says
    ``method="topkast"`` (the Lightning callback needs nothing else), or directly, with the same
    arguments. The sets are chosen from the magnitudes of the weights at construction (the dense
    initialisation). :meth:`masks` is the forward set ``A``; :meth:`gradient_masks` the backward set
    ``B`` (read by :func:`sparsetrain.contract.gradient_masks`, hence by gradient compression and
    the masked exchange). One optimizer must hold the sparsified weights and be attached (its
    step hooks move ``theta`` in and out of the parameter); DeepSpeed master weights (state
    maskers) are not supported.

    Raises:
        ValueError: as :class:`~sparsetrain.sparsity.DynamicSparsifier`; a config whose method is
            not ``"topkast"``; a module that already has Top-KAST buffers.
    """

    _grad_mask_name = BACKWARD_MASK_NAME
    _math_fields = (*MATH_FIELDS, "backward_extra", "exploration_penalty")

    def __init__(self, model: nn.Module, config: DynamicSparsityConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, process_group: Any = None,
                 total_steps: int | None = None, hook_optimizer: bool = True, **config_fields: Any) -> None:
        self._ready = False
        self._restored = False
        self._topkast_optimizers: list[int] = []
        method = config.method if isinstance(config, DynamicSparsityConfig) else config_fields.get("method")
        if method != "topkast":
            raise ValueError(f"TopKastSparsifier needs method='topkast', got method={method!r}")
        super().__init__(model, config, process_group=process_group, total_steps=total_steps, **config_fields)
        self._forward_counts = dict(self._expected_counts)
        self._backward_counts = backward_counts(self._shapes, self._forward_counts, float(self.config.backward_extra))
        self._densities = {n: self._forward_counts[n] / math.prod(s) for n, s in self._shapes.items()}
        self._set_changes = {"forward": 0, "backward": 0}  # positions that entered A / B at the latest update
        self._penalty = 0.0  # the exploration penalty at the latest set choice
        with torch.no_grad():
            for name, module in self._modules.items():
                for buf in (BACKWARD_MASK_NAME, DENSE_NAME):
                    if buf in module._buffers or hasattr(module, buf):
                        raise ValueError(f"module {name!r} already has a `{buf}` (Top-KAST attached twice?)")
                dense = module.weight.detach().clone()
                forward, backward = topkast_sets(dense, self._forward_counts[name], self._backward_counts[name])
                module._buffers[MASK_NAME].copy_(forward)
                module.register_buffer(BACKWARD_MASK_NAME, backward, persistent=True)
                module.register_buffer(DENSE_NAME, dense, persistent=True)
                self._ever_active[name] = forward.clone()
        self._recount(ever=True)
        self._penalty = self._penalty_now()
        self._ready = True
        if optimizer is not None:
            self.attach_optimizer(optimizer, hook=hook_optimizer)
        self.apply_masks()

    # ------------------------------------------------------------------ wiring

    def _exclude_masks_from_ddp(self) -> None:
        prefix = {m: n for n, m in self.model.named_modules()}
        names = [f"{prefix[m]}.{b}" if prefix[m] else b for m in self._modules.values()
                 for b in (MASK_NAME, BACKWARD_MASK_NAME, DENSE_NAME)]
        existing = list(getattr(self.model, "_ddp_params_and_buffers_to_ignore", []))
        self._ddp_ignored = [n for n in names if n not in existing]
        self.model._ddp_params_and_buffers_to_ignore = existing + self._ddp_ignored

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> None:
        """As :meth:`DynamicSparsifier.attach_optimizer`, plus the step pre-hook that moves ``theta`` on
        ``B \\ A`` into the parameter and adds the exploration penalty's gradient.

        Raises:
            ValueError: a second optimizer (Top-KAST moves the weights in and out of one optimizer's step).
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        new = id(optimizer) not in self._topkast_optimizers
        if new and self._topkast_optimizers:
            raise ValueError("method='topkast' supports one optimizer holding the sparsified weights; a second one "
                             "was attached (detach_optimizers() first to replace it)")
        super().attach_optimizer(optimizer, hook=hook)
        if new:
            self._topkast_optimizers.append(id(optimizer))
            self._optimizer_handles.append(optimizer.register_step_pre_hook(self._topkast_pre_step))

    def detach_optimizers(self) -> None:
        super().detach_optimizers()
        self._topkast_optimizers = []

    def add_state_masker(self, masker: Callable[[list[tuple[nn.Parameter, torch.Tensor]]], None]) -> None:
        """Not supported: Top-KAST keeps ``theta`` outside the forward set, which a masker of master
        weights (DeepSpeed ZeRO) would destroy.

        Raises:
            ValueError: always.
        """
        raise ValueError("method='topkast' does not support state maskers (DeepSpeed ZeRO master weights): its "
                         "dense weights live outside the optimizer's parameters; use DDP")

    def remove(self) -> None:
        """As :meth:`DynamicSparsifier.remove`; also removes ``weight_backward_mask`` and ``weight_dense``
        (the weights keep the forward-set values ``where(A, theta, 0)``)."""
        if self._removed:
            return
        for module in self._modules.values():
            module._buffers.pop(BACKWARD_MASK_NAME, None)
            module._buffers.pop(DENSE_NAME, None)
        self._topkast_optimizers = []
        super().remove()

    # ------------------------------------------------------------------ views

    def gradient_masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the backward set ``B`` (bool, ``True`` = its gradient is kept and applied).

        What :func:`sparsetrain.contract.gradient_masks` returns for this component: compression
        residuals and the masked exchange follow ``B``. Live tensors: do not modify them.
        """
        return {_param(name): m._buffers[BACKWARD_MASK_NAME] for name, m in self._modules.items()}

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``theta``, the dense weights (live buffers: do not modify them)."""
        return {_param(name): m._buffers[DENSE_NAME] for name, m in self._modules.items()}

    def _checked_masks(self) -> dict[str, torch.Tensor]:
        backward = {f"{k} (backward set)": v for k, v in self.gradient_masks().items()}
        return {**self.masks(), **backward}

    # ------------------------------------------------------------------ the step

    def _topkast_pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.before_optimizer_step()
            return None

        def restoring_closure():  # the gradients exist only after the closure (Lightning's optimizers)
            loss = closure()
            self.before_optimizer_step()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": restoring_closure}
        return (args[0], restoring_closure, *args[2:]), kwargs

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Move ``theta`` on ``B \\ A`` into the parameters and add the exploration penalty's gradient.

        The attached optimizer's step pre-hook calls it (once per step; later calls do nothing).
        """
        if self._restored or self._removed:
            return
        scale = float(self.config.exploration_penalty)
        for name, module in self._modules.items():
            w, a, b = module.weight, module._buffers[MASK_NAME], module._buffers[BACKWARD_MASK_NAME]
            dense = module._buffers[DENSE_NAME]
            torch.where(b, dense, w, out=w)  # W == theta on A already, 0 outside B
            if scale and w.grad is not None:
                w.grad.add_(exploration_penalty_grad(w, a, b, scale, self._densities[name]))
        self._restored = True

    def step(self) -> None:
        """After ``optimizer.step()``: ``theta[B] = W[B]``, ``W = where(A, W, 0)``, then re-choose the sets if due
        (and the rank check), as :meth:`DynamicSparsifier.step`.

        Raises:
            RuntimeError: no schedule yet, removed, or no optimizer attached.
        """
        if self.schedule is None or self._removed:
            super().step()  # raises, naming what is missing
        if not self._topkast_optimizers:
            raise RuntimeError("method='topkast' needs its optimizer attached (DynamicSparsifier(..., optimizer=opt) "
                               "or attach_optimizer(opt)): its step hooks move the dense weights in and out")
        if self._restored:
            with torch.no_grad():
                for module in self._modules.values():
                    w, dense = module.weight, module._buffers[DENSE_NAME]
                    torch.where(module._buffers[BACKWARD_MASK_NAME], w, dense, out=dense)
                    contract.mask_(w, module._buffers[MASK_NAME], self._bits)
            self._restored = False
        super().step()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Copy each weight's forward-set values to ``theta``, zero the weight outside its forward set
        and every same-shape optimizer state outside its backward set."""
        if not getattr(self, "_ready", False):
            return  # during construction, before the sets exist
        for module in self._modules.values():
            w, a, b = module.weight, module._buffers[MASK_NAME], module._buffers[BACKWARD_MASK_NAME]
            dense = module._buffers[DENSE_NAME]
            torch.where(a, w, dense, out=dense)  # the parameter is authoritative on A
            contract.mask_(w, a, self._bits)
            for state in self._iter_state_tensors(w):
                contract.mask_(state, b, self._bits)

    @torch.no_grad()
    def _update(self, t: int) -> None:
        dense = {name: m._buffers[DENSE_NAME] for name, m in self._modules.items()}
        finite = torch.stack([torch.isfinite(d).all() for d in dense.values()]).tolist()
        if not all(finite):
            bad = [name for name, ok in zip(dense, finite) if not ok]
            raise ValueError(f"Top-KAST set update at step {t}: the weights of layer(s) {', '.join(bad)} hold "
                             "NaN or inf. Fix the divergence (learning rate, loss scaling) or resume from an earlier "
                             "checkpoint")
        counted = []
        for name, module in self._modules.items():
            a_old, b_old = module._buffers[MASK_NAME], module._buffers[BACKWARD_MASK_NAME]
            a, b = topkast_sets(dense[name], self._forward_counts[name], self._backward_counts[name])
            ever = self._ever_active[name]
            counted += [(a & ~a_old).sum(), (b & ~b_old).sum(), (a & ~ever).sum()]
            a_old.copy_(a)
            b_old.copy_(b)
            ever |= a
            w = module.weight
            torch.where(a, dense[name], w.new_zeros(()), out=w)
        self.apply_masks()  # states outside the new B
        flat = host_ints(counted)
        entered_a, entered_b = sum(flat[0::3]), sum(flat[1::3])
        for name, first_time in zip(self._modules, flat[2::3]):
            self._ever_counts[name] += first_time
        self._updates += 1
        self._regrown_total += entered_a
        self._set_changes = {"forward": entered_a, "backward": entered_b}
        if entered_a or entered_b:
            self.mask_version += 1
        self._penalty = self._penalty_now()
        self._last_update = {"regrown": entered_a, "drop_fraction": 0.0, "target": float(self.config.sparsity)}

    def _penalty_now(self) -> float:
        scale = float(self.config.exploration_penalty)
        total = torch.zeros((), dtype=torch.float64)
        for name, m in self._modules.items():
            total += exploration_penalty(m._buffers[DENSE_NAME], m._buffers[MASK_NAME], m._buffers[BACKWARD_MASK_NAME],
                                         scale, self._densities[name]).cpu()
        return float(total)

    # ------------------------------------------------------------------ statistics and state

    def statistics(self) -> dict[str, float]:
        """:meth:`DynamicSparsifier.statistics` plus ``sparsity/backward_density`` (share of the
        sparsified weights in ``B``), ``sparsity/entered_backward`` (positions that entered ``B`` at the
        latest set update; ``sparsity/regrown`` counts those that entered ``A``) and
        ``sparsity/exploration_penalty`` (the penalty at the latest set choice)."""
        out = super().statistics()
        total = out["sparsity/total"]
        out["sparsity/backward_density"] = sum(self._backward_counts.values()) / total if total else 0.0
        out["sparsity/entered_backward"] = float(self._set_changes["backward"])
        out["sparsity/exploration_penalty"] = float(self._penalty)
        return out

    def state_dict(self) -> dict[str, Any]:
        """:meth:`DynamicSparsifier.state_dict` plus a versioned ``"topkast"`` entry (the latest set
        changes and penalty). The sets and ``theta`` are model buffers (``weight_mask``,
        ``weight_backward_mask``, ``weight_dense``) in ``model.state_dict()``."""
        state = super().state_dict()
        state["topkast"] = {
            "version": _TOPKAST_STATE_VERSION,
            "backward_counts": dict(self._backward_counts),
            "set_changes": dict(self._set_changes),
            "penalty": float(self._penalty),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`DynamicSparsifier.load_state_dict` (load the model's state dict first: it holds the
        sets and ``theta``), plus the ``"topkast"`` entry.

        Raises:
            ValueError: as the base; a missing, malformed or mismatching ``"topkast"`` entry; model
                buffers that are not valid Top-KAST sets or dense weights (named). Nothing is changed then.
        """
        entry = state.get("topkast") if isinstance(state, dict) else None
        if not isinstance(entry, dict):
            raise ValueError("`state` has no 'topkast' entry: it was not saved by a Top-KAST sparsifier")
        if entry.get("version") != _TOPKAST_STATE_VERSION:
            raise ValueError(f"`state['topkast']` version must be {_TOPKAST_STATE_VERSION}, "
                             f"got {entry.get('version')!r}")
        if entry.get("backward_counts") != self._backward_counts:
            raise ValueError(f"`state['topkast']['backward_counts']` is {entry.get('backward_counts')!r}, this "
                             f"sparsifier's backward sets hold {self._backward_counts}: saved with another "
                             "backward_extra, sparsity or distribution?")
        changes = entry.get("set_changes")
        if not isinstance(changes, dict) or set(changes) != {"forward", "backward"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in changes.values()):
            raise ValueError(f"`state['topkast']['set_changes']` must map 'forward' and 'backward' to ints >= 0, "
                             f"got {changes!r}")
        penalty = entry.get("penalty")
        if isinstance(penalty, bool) or not isinstance(penalty, float) or not math.isfinite(penalty) or penalty < 0:
            raise ValueError(f"`state['topkast']['penalty']` must be a finite float >= 0, got {penalty!r}")
        for name, module in self._modules.items():
            self._check_buffers(name, module._buffers[MASK_NAME], module._buffers[BACKWARD_MASK_NAME],
                                module._buffers[DENSE_NAME], "the model's")
        super().load_state_dict(state)
        self._set_changes = dict(changes)
        self._penalty = penalty
        self._restored = False

    def _check_buffers(self, name: str, forward: Any, backward: Any, dense: Any, where: str) -> None:
        """Check ``backward`` (and ``dense``, when given) as layer ``name``'s Top-KAST buffers."""
        shape = self._shapes[name]
        what = f"{where} `{name}.{BACKWARD_MASK_NAME}`"
        if backward is not None:
            if not isinstance(backward, torch.Tensor) or backward.dtype != torch.bool \
                    or tuple(backward.shape) != shape:
                got = f"{backward.dtype} {tuple(backward.shape)}" if isinstance(backward, torch.Tensor) \
                    else type(backward).__name__
                raise ValueError(f"{what} must be a bool tensor of shape {shape}, got {got}")
            kept = int(backward.sum())
            if kept != self._backward_counts[name]:
                raise ValueError(f"{what} keeps {kept} weights, this sparsifier's backward set of {name!r} holds "
                                 f"{self._backward_counts[name]}: saved with another backward_extra or sparsity?")
            if isinstance(forward, torch.Tensor) and forward.shape == backward.shape \
                    and bool((forward & ~backward.to(forward.device)).any()):
                raise ValueError(f"{what} does not contain the forward set `{name}.{MASK_NAME}` (B must contain A)")
        if dense is not None:
            what = f"{where} `{name}.{DENSE_NAME}`"
            weight = self._modules[name].weight
            if not isinstance(dense, torch.Tensor) or dense.dtype != weight.dtype or tuple(dense.shape) != shape:
                got = f"{dense.dtype} {tuple(dense.shape)}" if isinstance(dense, torch.Tensor) \
                    else type(dense).__name__
                raise ValueError(f"{what} must be a {weight.dtype} tensor of shape {shape}, got {got}")
            if not bool(torch.isfinite(dense).all()):
                raise ValueError(f"{what} holds NaN or inf")

    def _before_load(self, module: nn.Module, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._before_load(module, state_dict, prefix, *args)
        for name in self._modules:
            base = f"{prefix}{name}." if name else prefix
            self._check_buffers(name, state_dict.get(f"{base}{MASK_NAME}"),
                                state_dict.get(f"{base}{BACKWARD_MASK_NAME}"), state_dict.get(f"{base}{DENSE_NAME}"),
                                "`state_dict`'s")

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        self._restored = False
        super()._after_load(module, incompatible_keys)


def _param(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"

