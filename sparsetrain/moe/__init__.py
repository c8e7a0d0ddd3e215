"""Top-k routed mixture-of-experts: router, grouped experts, the layer, its losses (docs/moe.md)."""

from .balance import MoEBalancer, MoEBalancerConfig
from .experts import GroupedExperts
from .layer import MoE, moe_layers, moe_losses
from .parallel import expert_state_dict, full_expert_state_dict, load_expert_state_dict
from .router import RouterConfig, RouterOutput, TopKRouter, capacity, load_balancing_loss, z_loss
from .upcycle import dense_mlps, upcycle

__all__ = [
    "GroupedExperts",
    "MoE",
    "MoEBalancer",
    "MoEBalancerConfig",
    "RouterConfig",
    "RouterOutput",
    "TopKRouter",
    "capacity",
    "dense_mlps",
    "expert_state_dict",
    "full_expert_state_dict",
    "load_expert_state_dict",
    "load_balancing_loss",
    "moe_layers",
    "moe_losses",
    "upcycle",
    "z_loss",
]
