"""Top-k token-choice router: fp32 scores, top-k gates, balancing losses, capacity.

Legend: T tokens, D model width, E experts, K experts per token (top-k), N = T*K assignments.

Formulas (FIELD_NOTES section 5):

- Switch load-balancing loss (Fedus et al. 2021, eq. 4): ``aux = alpha * E * sum_i f_i * P_i`` with
  ``f_i`` the fraction of the N assignments that chose expert i BEFORE capacity dropping (so
  ``sum_i f_i = 1``) and ``P_i`` the mean over tokens of the full softmax probability of expert i.
  Perfect balance gives ``aux = alpha``; fairscale's variant lacks the factor E.
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): ``z = c_z * mean_t logsumexp(logits_t)^2``.
- Aux-loss-free balancing (DeepSeek-V3, Liu et al. 2024, section 2.1.2): a per-expert bias added to the
  scores for the SELECTION only (gates come from the unbiased scores), moved by ``bias_update_rate`` times
  ``sign(mean load - load_i)`` once per optimizer step (:meth:`TopKRouter.update_bias`).
- Capacity (GShard / Switch): ``C = max(min_capacity, ceil(capacity_factor * K * T / E))`` assignments
  per expert; assignments beyond C are dropped (priority: all first choices before second choices,
  then token order), dropless mode never drops.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _gloo

__all__ = ["RouterConfig", "RouterOutput", "TopKRouter", "capacity", "load_balancing_loss", "z_loss"]


@dataclass(kw_only=True)
class RouterConfig:
    """How tokens are routed.

    Args:
        num_experts: E, the number of experts (>= 1).
        k: experts per token, ``1 <= k <= num_experts``.
        score_order: ``"softmax_topk"`` (default; softmax over all E, keep the top k, renormalise the kept
            gates to sum to 1 when ``renormalize``) or ``"topk_softmax"`` (top k of the logits, softmax over
            those k only: gates always sum to 1).
        renormalize: with ``softmax_topk``, divide the kept gates by their sum (needed for upcycling to
            preserve the dense function at init). None (default): True for k > 1, False for k = 1, where
            renormalising makes every gate 1 and the router would learn from the auxiliary losses only
            (Switch's top-1 gate is the router probability itself).
        jitter_eps: multiplicative input jitter ``x * U(1-eps, 1+eps)`` in training only (0 disables).
        aux_loss_coef: alpha of the Switch load-balancing loss (0 disables).
        z_loss_coef: c_z of the router z-loss (0 disables).
        bias_update_rate: u of the aux-loss-free selection bias (0 disables the bias).
        capacity_factor: training capacity factor (> 0); ignored when ``dropless``.
        eval_capacity_factor: capacity factor in eval mode (> 0); ignored when ``dropless``.
        min_capacity: the smallest capacity per expert (>= 0).
        dropless: never drop an assignment (every expert takes whatever it is sent).
    """

    num_experts: int
    k: int = 2
    score_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    renormalize: bool | None = None
    jitter_eps: float = 0.0
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "k", "min_capacity"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"`{name}` must be an int, got {v!r}")
        if self.num_experts < 1:
            raise ValueError(f"`num_experts` must be >= 1, got {self.num_experts}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"`k` must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.score_order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"`score_order` must be 'softmax_topk' or 'topk_softmax', got {self.score_order!r}")
        if self.renormalize is None:
            self.renormalize = self.k > 1
        elif not isinstance(self.renormalize, bool):
            raise ValueError(f"`renormalize` must be a bool or None, got {self.renormalize!r}")
        if not 0.0 <= self.jitter_eps < 1.0:
            raise ValueError(f"`jitter_eps` must be in [0, 1), got {self.jitter_eps}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"`{name}` must be a finite float >= 0, got {v!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a finite float > 0, got {v!r}")
        if self.min_capacity < 0:
            raise ValueError(f"`min_capacity` must be >= 0, got {self.min_capacity}")


class RouterOutput(NamedTuple):
    """One routing decision. ``kept_TK`` is False for assignments dropped by capacity."""

    indices_TK: torch.Tensor  # int64 expert ids
    gates_TK: torch.Tensor  # fp32 gate weights (0 where dropped)
    kept_TK: torch.Tensor  # bool
    probs_TE: torch.Tensor  # fp32 full softmax, for the losses and statistics
    counts_E: torch.Tensor  # int64 assignments per expert before capacity
    aux_loss: torch.Tensor  # fp32 scalar (already times aux_loss_coef)
    z_loss: torch.Tensor  # fp32 scalar (already times z_loss_coef)


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """``max(min_capacity, ceil(capacity_factor * k * num_tokens / num_experts))`` (GShard / Switch)."""
    return max(min_capacity, math.ceil(capacity_factor * k * num_tokens / num_experts))


def _counts(ids_sorted_N: torch.Tensor, num_bins: int) -> torch.Tensor:
    """How many of the sorted ids equal each of ``0 .. num_bins-1`` (int64).

    Binary search over the sorted ids: unlike ``torch.bincount`` on CUDA (which reads the maximum on
    the host to size its output), no host sync, and unlike an atomic scatter-add, deterministic.
    """
    bounds = torch.searchsorted(ids_sorted_N, torch.arange(num_bins + 1, device=ids_sorted_N.device))
    return bounds[1:] - bounds[:-1]


def load_balancing_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch's ``E * sum_i f_i * P_i`` (without alpha), f from the pre-capacity assignments.

    Args:
        probs_TE: full softmax router probabilities.
        indices_TK: the chosen experts (before any capacity dropping).
    """
    T, E = probs_TE.shape
    counts_E = _counts(torch.sort(indices_TK.reshape(-1)).values, E).to(probs_TE.dtype)
    f_E = counts_E / indices_TK.numel()
    P_E = probs_TE.mean(dim=0)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's ``mean_t logsumexp(logits_t)^2`` (without c_z)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def _positions_in_expert(indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each assignment's rank among those sent to the same expert (slot-major, then token order).

    A stable sort by expert over the slot-major order, no one-hot tensor and no host sync.
    """
    T, K = indices_TK.shape
    flat_N = indices_TK.t().reshape(-1)  # slot-major: all first choices first
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = _counts(flat_N[order_N], num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_sorted_N = torch.arange(flat_N.numel(), device=flat_N.device) - starts_E[flat_N[order_N]]
    pos_N = torch.empty_like(pos_sorted_N)
    pos_N[order_N] = pos_sorted_N
    return pos_N.view(K, T).t()


class TopKRouter(nn.Module):
    """Token-choice top-k router (``forward(x_TD) -> RouterOutput``).

    The gate is a bias-free linear map computed in fp32 (fp64 for fp64 inputs) whatever the input
    dtype. Noise (input jitter) is applied only in training; in eval mode the routing is a
    deterministic function of the input. The selection bias (``selection_bias_E``, an fp32 buffer,
    zero and unused unless ``bias_update_rate > 0``) shifts the selection only.
    """

    def __init__(self, d_model: int, config: RouterConfig | None = None, **config_fields: Any) -> None:
        super().__init__()
        if config is not None and config_fields:
            raise ValueError("give `config` or its fields as keywords, not both")
        self.config = config = config or RouterConfig(**config_fields)
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"`d_model` must be an int >= 1, got {d_model!r}")
        self.d_model = d_model
        E = config.num_experts
        self.weight_ED = nn.Parameter(torch.empty(E, d_model))
        nn.init.normal_(self.weight_ED, std=d_model ** -0.5)
        # selection bias and the load counted since its last update
        self.register_buffer("selection_bias_E", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("pending_load_E", torch.zeros(E, dtype=torch.float32))

    def _apply(self, fn: Any, recurse: bool = True) -> TopKRouter:
        # the bias and the load count stay fp32 under .to(bfloat16) / .half(): u ~ 1e-3 steps need the precision
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and old is not None and new.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        x_TD = x_TD.to(dtype)
        if self.training and self.config.jitter_eps > 0:
            eps = self.config.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        with torch.autocast(x_TD.device.type, enabled=False):  # autocast would run the gate in bf16
            return F.linear(x_TD, self.weight_ED.to(dtype))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.config
        T = x_TD.shape[0]
        E, K = cfg.num_experts, cfg.k
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        scores_TE = probs_TE if cfg.score_order == "softmax_topk" else logits_TE
        select_TE = scores_TE + self.selection_bias_E if cfg.bias_update_rate > 0 else scores_TE
        # torch.topk on equal scores is not guaranteed to prefer the lower index; sort stable instead
        indices_TK = torch.sort(select_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :K]
        picked_TK = scores_TE.gather(1, indices_TK)
        if cfg.score_order == "topk_softmax":
            gates_TK = torch.softmax(picked_TK, dim=-1)
        elif cfg.renormalize:
            gates_TK = picked_TK / picked_TK.sum(dim=-1, keepdim=True)
        else:
            gates_TK = picked_TK
        counts_E = _counts(torch.sort(indices_TK.reshape(-1)).values, E)
        if cfg.dropless:
            kept_TK = torch.ones_like(indices_TK, dtype=torch.bool)
        else:
            factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            cap = capacity(T, E, K, factor, cfg.min_capacity)
            kept_TK = _positions_in_expert(indices_TK, E) < cap
        gates_TK = torch.where(kept_TK, gates_TK, torch.zeros((), device=gates_TK.device))
        zero = logits_TE.new_zeros(())
        aux = cfg.aux_loss_coef * load_balancing_loss(probs_TE, indices_TK) if cfg.aux_loss_coef > 0 else zero
        zl = cfg.z_loss_coef * z_loss(logits_TE) if cfg.z_loss_coef > 0 else zero
        if self.training and cfg.bias_update_rate > 0:
            self.pending_load_E += counts_E.to(torch.float32)
        return RouterOutput(indices_TK, gates_TK, kept_TK, probs_TE, counts_E, aux, zl)

    @torch.no_grad()
    def update_bias(self, process_group: Any = None) -> None:
        """Move the selection bias toward balance: ``bias += u * sign(mean load - load)``; reset the count.

        The loads counted since the last call (every micro-batch) are summed over ``process_group`` first
        (when torch.distributed is initialised), so every rank applies the same update. Call once per
        optimizer step (:class:`sparsetrain.moe.MoEBalancer` does).
        """
        u = self.config.bias_update_rate
        if u <= 0:
            return
        load_E = self.pending_load_E.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
            if dist.get_backend(process_group) == "nccl" and load_E.device.type == "cpu":
                load_E = load_E.cuda()
            dist.all_reduce(_gloo.handed(load_E, process_group), group=process_group)
            _gloo.wait_for_release()
            load_E = load_E.to(self.pending_load_E.device)
        self.selection_bias_E += u * torch.sign(load_E.mean() - load_E)
        self.pending_load_E.zero_()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, " + ", ".join(
            f"{f.name}={getattr(self.config, f.name)!r}" for f in dataclasses.fields(self.config))
