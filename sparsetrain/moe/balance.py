"""The MoE component: per-step selection-bias updates, the rank check, and the layers' statistics.

``MoEBalancer(model, optimizer=..., process_group=...)`` follows the component contract
(docs/architecture.md): ``step()`` once per optimizer step moves every router's aux-loss-free
selection bias toward balance (DeepSeek-V3) from the loads summed over the micro-batches since
the last step and over ``process_group``, so the bias stays identical on every rank;
``check_ranks()`` raises :class:`~sparsetrain.contract.RankDivergenceError` when it does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsetrain import contract

from .layer import MoE, moe_layers

__all__ = ["MoEBalancer", "MoEBalancerConfig"]

_VERSION = 1


@dataclass(kw_only=True)
class MoEBalancerConfig:
    """Args:
    update_every: move the selection biases every this many optimizer steps (>= 1), from the loads
        counted over those steps (DeepSeek-V3: every step). Changes the math: a state saved with another
        value is refused.
    verify_every: check that the selection biases are identical on every rank every this many
        optimizer steps (0: never).
    """

    update_every: int = 1
    verify_every: int = 100

    def __post_init__(self) -> None:
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"`update_every` must be an int >= 1, got {self.update_every!r}")
        if isinstance(self.verify_every, bool) or not isinstance(self.verify_every, int) or self.verify_every < 0:
            raise ValueError(f"`verify_every` must be an int >= 0, got {self.verify_every!r}")


_MATH_FIELDS = ("update_every",)
_ROUTING_KEYS = ("load", "dropped", "assignments", "tokens_dropped", "entropy", "aux_loss", "z_loss", "tokens")
_PER_EXPERT = ("load", "tokens")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The exact bits of a float tensor as int64 (equal tensors give equal rows)."""
    t = t.detach().float().cpu().contiguous()
    return t.view(torch.int32).to(torch.int64).reshape(-1)


class MoEBalancer:
    """Updates the MoE layers' selection biases once per optimizer step; their statistics; the rank check.

    Args:
        model: a model with :class:`~sparsetrain.moe.MoE` layers (a DDP wrapper stands for its module).
        config: a :class:`MoEBalancerConfig`, or its fields as keywords.
        optimizer: when given, :meth:`step` runs after each of its steps (a step post-hook).
        process_group: the group whose loads are summed (every rank that routes its own tokens with the
            same router: the data-parallel group, expert-parallel ranks included); default: the world.

    Raises:
        ValueError: the model has no MoE layer.
    """

    masks_gradients = False

    def __init__(self, model: nn.Module, config: MoEBalancerConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, process_group: Any = None,
                 **config_fields: Any) -> None:
        if config is not None and config_fields:
            raise ValueError("give `config` or its fields as keywords, not both")
        self.config = config or MoEBalancerConfig(**config_fields)
        self.layers: dict[str, MoE] = moe_layers(model)
        if not self.layers:
            raise ValueError("`model` has no MoE layer (sparsetrain.moe.MoE)")
        self.model = model
        self.process_group = process_group
        self.num_steps = 0
        self._hook = optimizer.register_step_post_hook(lambda *_: self.step()) if optimizer is not None else None
        contract.attach(model, self)

    # ------------------------------------------------------------------ lifecycle

    def step(self) -> None:
        """Once per optimizer step: update every selection bias every ``update_every`` steps (no-op for layers
        without one); the loads keep counting in between."""
        self.num_steps += 1
        if self.num_steps % self.config.update_every == 0:
            for layer in self.layers.values():
                layer.router.update_bias(self.process_group)
        every = self.config.verify_every
        if every and self.num_steps % every == 0:
            self.check_ranks()

    def masks(self) -> dict[str, torch.Tensor]:
        return {}

    def statistics(self) -> dict[str, float]:
        """Per layer ``moe/<layer>/...`` (see :meth:`MoE.statistics`) and, over all layers, ``moe/aux_loss``,
        ``moe/z_loss``, ``moe/drop_rate`` (mean), ``moe/imbalance`` (max), ``moe/bias_range`` (max - min of
        the selection biases). Reading them syncs with the device."""
        out: dict[str, float] = {}
        aux = z = drop = 0.0
        imbalance, spread, n = 0.0, 0.0, 0
        for name, layer in self.layers.items():
            s = layer.statistics(prefix=f"moe/{name}")
            if not s:
                continue
            out.update(s)
            n += 1
            aux += s[f"moe/{name}/aux_loss"]
            z += s[f"moe/{name}/z_loss"]
            drop += s[f"moe/{name}/drop_rate"]
            imbalance = max(imbalance, s[f"moe/{name}/imbalance"])
            b = layer.router.selection_bias_E
            spread = max(spread, float(b.max() - b.min()))
        if n:
            out.update({"moe/aux_loss": aux, "moe/z_loss": z, "moe/drop_rate": drop / n,
                        "moe/imbalance": imbalance, "moe/bias_range": spread})
        return out

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``{"version", "config", "num_steps", "selection_bias": {layer: bias}, "pending_load": {...},
        "last_routing": {layer: {...}}}``.

        The biases also live in the model's state dict (buffers); they are kept here too so that a
        component state alone resumes the balancing exactly. ``last_routing`` holds the figures of each
        layer's last forward, so that :meth:`statistics` reads the same after a resume.
        """
        return {
            "version": _VERSION,
            "config": dataclasses.asdict(self.config),
            "num_steps": self.num_steps,
            "selection_bias": {n: m.router.selection_bias_E.detach().cpu().clone() for n, m in self.layers.items()},
            "pending_load": {n: m.router.pending_load_E.detach().cpu().clone() for n, m in self.layers.items()},
            "last_routing": {n: {k: v.detach().cpu().clone() for k, v in m._stats.items()}
                             for n, m in self.layers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`.

        Raises:
            ValueError: an unknown version, missing or extra layers, or a bias of the wrong shape.
        """
        if not isinstance(state, dict) or state.get("version") != _VERSION:
            raise ValueError(f"MoEBalancer state must be a dict with version {_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        contract.check_config(state.get("config"), self.config, _MATH_FIELDS, "MoEBalancer")
        steps = state.get("num_steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"MoEBalancer state: `num_steps` must be an int >= 0, got {steps!r}")
        for key, attr in (("selection_bias", "selection_bias_E"), ("pending_load", "pending_load_E")):
            saved = state.get(key)
            if not isinstance(saved, dict) or set(saved) != set(self.layers):
                got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
                raise ValueError(f"MoEBalancer state: `{key}` must name the layers {sorted(self.layers)}, got {got}")
            for name, t in saved.items():
                live = getattr(self.layers[name].router, attr)
                if not isinstance(t, torch.Tensor) or t.shape != live.shape or not t.is_floating_point():
                    raise ValueError(f"MoEBalancer state: `{key}` of {name!r} must be a float tensor of shape "
                                     f"{tuple(live.shape)}, got {getattr(t, 'shape', type(t).__name__)}")
        routing = state.get("last_routing", {name: {} for name in self.layers})  # absent in older states
        if not isinstance(routing, dict) or set(routing) != set(self.layers):
            got = sorted(routing) if isinstance(routing, dict) else type(routing).__name__
            raise ValueError(f"MoEBalancer state: `last_routing` must name the layers {sorted(self.layers)}, got {got}")
        for name, figures in routing.items():
            E = self.layers[name].num_experts
            if not isinstance(figures, dict) or not set(figures) <= set(_ROUTING_KEYS) \
                    or (figures and not set(_ROUTING_KEYS[:-1]) <= set(figures)):
                raise ValueError(f"MoEBalancer state: `last_routing` of {name!r} must be empty or hold "
                                 f"{', '.join(_ROUTING_KEYS)}")
            for k, t in figures.items():
                shape = (E,) if k in _PER_EXPERT else ()
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not torch.isfinite(t.float()).all():
                    raise ValueError(f"MoEBalancer state: `last_routing` {name!r} {k!r} must be a finite tensor of "
                                     f"shape {shape}, got {getattr(t, 'shape', type(t).__name__)}")
        for key, attr in (("selection_bias", "selection_bias_E"), ("pending_load", "pending_load_E")):
            for name, t in state[key].items():
                with torch.no_grad():
                    getattr(self.layers[name].router, attr).copy_(t)
        for name, figures in routing.items():
            dev = self.layers[name].router.selection_bias_E.device
            self.layers[name]._stats = {k: t.to(dev).clone() for k, t in figures.items()}
        self.num_steps = steps

    def check_ranks(self) -> None:
        """Raise :class:`~sparsetrain.contract.RankDivergenceError` on every rank when a selection bias differs."""
        prints = {f"{n}.router.selection_bias_E": _bits(m.router.selection_bias_E) for n, m in self.layers.items()}
        contract.check_in_sync(prints, self.process_group, what=f"MoE selection biases after step {self.num_steps}")

    def remove(self) -> None:
        """Remove the optimizer hook and detach (the layers stay: they are the model)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        contract.detach(self.model, self)
