"""Top-k routed mixture-of-experts: router, grouped experts, the layer, its losses (docs/moe.md)."""

from .experts import GroupedExperts
from .layer import MoE, moe_layers, moe_losses
from .router import RouterConfig, RouterOutput, TopKRouter, capacity, load_balancing_loss, z_loss

__all__ = [
    "GroupedExperts",
    "MoE",
    "RouterConfig",
    "RouterOutput",
    "TopKRouter",
    "capacity",
    "load_balancing_loss",
    "moe_layers",
    "moe_losses",
    "z_loss",
]
