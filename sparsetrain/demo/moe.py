"""The demo GPT with mixture-of-experts MLPs, as a LightningModule a recipe names by ``class_path``.

``MoEDemoLM`` builds the demo GPT and replaces its MLPs by :class:`sparsetrain.moe.MoE` layers, either
fresh (experts of hidden width ``mlp_ratio * d_model / k``: the dense model's active parameters) or
upcycled from a dense demo checkpoint (``upcycle_from``: every expert a copy of the trained MLP). With
``expert_parallel = P > 1`` the experts are spread over groups of P ranks and the LightningModule applies
the recipe of docs/moe.md itself: process groups, the expert weights left out of DDP, their own
data-parallel reduction, gradient clipping with one norm for all ranks, and checkpoints that hold every
expert (weights and optimizer state, by global expert id) so that they load at any expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from .. import _gloo
from ..moe import (
    MoE,
    expert_data_parallel_groups,
    expert_parameter_names,
    globalize_optimizer_state,
    localize_optimizer_state,
    moe_layers,
    reduce_expert_gradients,
    shard_experts,
    upcycle,
)
from ..moe.parallel import gather_expert_stack
from .lightning import DemoLM
from .model import GPTConfig

__all__ = ["MoEDemoLM"]


def _dense_gpt_state(path: str) -> dict[str, torch.Tensor]:
    """The GPT weights of a dense demo checkpoint (a Lightning ``.ckpt`` of ``DemoLM``, or a plain
    ``GPT.state_dict()``), read with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`upcycle_from` must be an existing checkpoint file, got {str(path)!r}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  corrupt file, pickled objects: all mean "not a checkpoint"
        raise ValueError(f"`upcycle_from` {str(path)!r} is not a readable checkpoint: {type(err).__name__}: {err}") \
            from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"`upcycle_from` {str(path)!r} holds no GPT state dict")
    return state


class MoEDemoLM(DemoLM):
    """The demo GPT whose MLPs are top-k routed mixtures of experts (docs/moe.md).

    Args:
        block_size, n_layer, n_head, d_model, mlp_ratio, dropout: the GPT (:class:`GPTConfig`).
        num_experts: E, experts per MoE layer.
        k: experts per token.
        include: globs over the GPT's MLP names that become MoE layers (default: every block's).
        activation: the fresh experts' activation, ``"gelu"`` (as the dense MLP) or ``"swiglu"``.
        expert_hidden: a fresh expert's hidden width (default ``mlp_ratio * d_model // k``: as many active
            expert weights per token as the dense MLP). Upcycled experts keep the MLP's width.
        capacity_factor, eval_capacity_factor, min_capacity, dropless, aux_loss_coef, z_loss_coef,
        bias_update_rate, jitter_eps: the routers' :class:`~sparsetrain.moe.RouterConfig`.
        moe_loss_coef: weight of the MoE losses in the training loss (:class:`DemoLM`).
        expert_parallel: P, the ranks that share one copy of all experts (1: every rank holds all of them and
            DDP averages them as any weight). Must divide the world size and ``num_experts``.
        upcycle_from: a dense demo checkpoint (``DemoLM``'s ``.ckpt`` or a ``GPT`` state dict) of the same
            GPT sizes: its weights are loaded and its MLPs upcycled (sparse upcycling, experts copy the MLP).
        optimizer, lr, weight_decay, momentum, warmup_steps: as :class:`DemoLM`.

    Raises:
        ValueError: a bad size or router field (naming it), ``expert_parallel`` not dividing
            ``num_experts``, an ``upcycle_from`` that is not a readable dense checkpoint of this GPT.
    """

    def __init__(
        self,
        block_size: int = 128,
        n_layer: int = 2,
        n_head: int = 2,
        d_model: int = 128,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        num_experts: int = 4,
        k: int = 2,
        include: Sequence[str] | None = None,
        activation: Literal["gelu", "swiglu"] = "gelu",
        expert_hidden: int | None = None,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        dropless: bool = False,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        bias_update_rate: float = 0.0,
        jitter_eps: float = 0.0,
        moe_loss_coef: float = 1.0,
        expert_parallel: int = 1,
        upcycle_from: str | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        warmup_steps: int = 0,
    ) -> None:
        cfg = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
                        mlp_ratio=mlp_ratio, dropout=dropout)
        super().__init__(model=cfg, optimizer=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         warmup_steps=warmup_steps, moe_loss_coef=moe_loss_coef)
        if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int) or expert_parallel < 1:
            raise ValueError(f"`expert_parallel` must be an int >= 1, got {expert_parallel!r}")
        if isinstance(num_experts, int) and num_experts % expert_parallel:
            raise ValueError(f"`expert_parallel`={expert_parallel} must divide `num_experts`={num_experts}")
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"`activation` must be 'gelu' or 'swiglu', got {activation!r}")
        router = dict(capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                      min_capacity=min_capacity, dropless=dropless, aux_loss_coef=aux_loss_coef,
                      z_loss_coef=z_loss_coef, bias_update_rate=bias_update_rate, jitter_eps=jitter_eps)
        include = list(include) if include is not None else ["blocks.*.mlp"]
        if upcycle_from is not None:
            if expert_hidden is not None or activation != "gelu":
                raise ValueError("`upcycle_from`: upcycled experts copy the dense GELU MLP; leave `expert_hidden` "
                                 "and `activation` unset")
            self.model.load_state_dict(_dense_gpt_state(upcycle_from))  # strict: a GPT of other sizes fails here
            upcycle(self.model, num_experts=num_experts, k=k, include=include, **router)
        else:
            from ..moe import dense_mlps

            hidden = expert_hidden if expert_hidden is not None else mlp_ratio * d_model // k
            if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
                raise ValueError(f"`expert_hidden` must be an int >= 1, got {expert_hidden!r}")
            for name in dense_mlps(self.model, include):
                parent, _, attr = name.rpartition(".")
                # the layer's own init (nn.Linear's per expert): on the demo LM it trained to a lower validation
                # loss than the dense GPT's init (benchmarks/RESULTS.md, moe_quality.py --expert-init)
                layer = MoE(d_model, hidden, num_experts, k, activation=activation, bias=activation == "gelu",
                            **router)
                setattr(self.model.get_submodule(parent) if parent else self.model, attr, layer)
        self.expert_parallel = expert_parallel
        self._edp_group: Any = None
        self._world = 1

    # ------------------------------------------------------------------ expert parallelism

    def setup(self, stage: str) -> None:
        self.setup_expert_parallel()

    def setup_expert_parallel(self) -> None:
        """Split the experts over the expert-parallel groups (after the process group exists, before DDP
        wraps the module and before the optimizer is built) and leave them out of DDP; a no-op once done.

        Lightning runs the callbacks' ``setup`` before the module's, so the
        :class:`~sparsetrain.callbacks.DynamicSparsity` callback calls this first: its masks are built on
        the experts this rank holds.
        """
        if self.expert_parallel == 1 or any(m.ep_size > 1 for m in moe_layers(self.model).values()):
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"`expert_parallel`={self.expert_parallel} needs a distributed run "
                             "(trainer.strategy: ddp with several devices)")
        ep_group, self._edp_group = expert_data_parallel_groups(self.expert_parallel)
        self._world = dist.get_world_size()
        shard_experts(self.model, ep_group)
        ignore = [f"model.{n}" for n in expert_parameter_names(self.model)]
        # the routers' per-rank load counters are not DDP's either (it would broadcast rank 0's)
        ignore += [n for n, _ in self.named_buffers() if n.endswith("pending_load_E")]
        existing = list(getattr(self, "_ddp_params_and_buffers_to_ignore", []))
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, existing + [n for n in ignore if n not in existing])

    def _expert_parallel(self) -> bool:
        return any(m.ep_size > 1 for m in moe_layers(self.model).values())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._expert_parallel():  # DDP averaged everything but the experts
            reduce_expert_gradients(self.model, self._edp_group, self._world)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """With expert parallelism, clip by the norm of the whole model's gradient (every expert counted
        once), the same on every rank; otherwise Lightning's own clipping."""
        if not self._expert_parallel() or gradient_clip_val is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"`gradient_clip_algorithm` must be 'norm' with expert parallelism, got "
                             f"{gradient_clip_algorithm!r}")
        experts = {id(p) for m in moe_layers(self.model).values() for p in m.experts.parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        dense_sq = sum((p.grad.detach().float().square().sum() for p in params if id(p) not in experts),
                       torch.zeros(()))
        expert_sq = sum((p.grad.detach().float().square().sum() for p in params if id(p) in experts),
                        torch.zeros(()))
        layer = next(m for m in moe_layers(self.model).values() if m.ep_size > 1)
        dist.all_reduce(_gloo.handed(expert_sq, layer.ep_group), group=layer.ep_group)  # this copy's other experts
        _gloo.wait_for_release()
        norm = float((dense_sq + expert_sq).sqrt())
        coef = float(gradient_clip_val) / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                p.grad.detach().mul_(coef)

    # ------------------------------------------------------------------ checkpoints

    def _optimizer_params(self) -> list[nn.Parameter]:
        return list(self.parameters())  # the order configure_optimizers gives the optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Write every expert, not only this rank's: the full ``[E, ...]`` stacks (index = global expert id)
        in the state dict and in the optimizer state. Collective (every rank saves: Lightning calls this
        hook on all of them and writes rank 0's)."""
        if not self._expert_parallel():
            return
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            for name, layer in moe_layers(self.model).items():
                for pname, p in layer.experts.named_parameters():
                    sd[f"model.{name}.experts.{pname}"] = gather_expert_stack(layer, p.detach()).cpu()
        states = checkpoint.get("optimizer_states")
        if states and self.trainer is not None:
            for opt, state in zip(self.trainer.optimizers, states):
                globalize_optimizer_state(self.model, opt, state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Cut the full expert stacks of the optimizer state to this rank's experts (the model's state dict
        is cut by the MoE layers themselves when it loads)."""
        states = checkpoint.get("optimizer_states")
        if states:
            params = self._optimizer_params()
            for state in states:
                localize_optimizer_state(self.model, params, state)
