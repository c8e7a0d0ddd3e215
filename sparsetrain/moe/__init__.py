"""Top-k routed mixture-of-experts: router, grouped experts, the layer, its losses (docs/moe.md)."""

from .balance import MoEBalancer, MoEBalancerConfig
from .experts import GroupedExperts
from .layer import MoE, moe_layers, moe_losses
from .parallel import (
    derive_expert_data_parallel_group,
    expert_data_parallel_groups,
    expert_parameter_names,
    expert_state_dict,
    full_expert_optimizer_state_dict,
    full_expert_state_dict,
    gather_expert_stack,
    globalize_optimizer_state,
    load_expert_optimizer_state_dict,
    load_expert_state_dict,
    localize_optimizer_state,
    reduce_expert_gradients,
    shard_experts,
)
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
    "derive_expert_data_parallel_group",
    "expert_data_parallel_groups",
    "expert_parameter_names",
    "expert_state_dict",
    "full_expert_optimizer_state_dict",
    "full_expert_state_dict",
    "gather_expert_stack",
    "globalize_optimizer_state",
    "load_expert_optimizer_state_dict",
    "load_expert_state_dict",
    "localize_optimizer_state",
    "reduce_expert_gradients",
    "shard_experts",
    "load_balancing_loss",
    "moe_layers",
    "moe_losses",
    "upcycle",
    "z_loss",
]
