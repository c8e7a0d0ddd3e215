"""The top-k routed mixture-of-experts layer, and the collection of its losses.

Legend: T tokens, D model width, E experts, K experts per token, N = T*K assignments (token-major:
row ``t*K + j`` is token t's j-th choice), ``_S`` suffix: rows sorted by expert.

Dispatch sorts the N assignments by expert (a stable argsort: no one-hot tensor, cost linear in N),
gathers the token rows in that order, runs the experts as grouped GEMMs, gathers the outputs back to
token-major order and sums each token's K outputs weighted by their gates. Both gathers are
permutations whose backward is the inverse gather, so forward and backward are deterministic (no
scatter-add). Dropped assignments (capacity) contribute zero: the block's residual carries their token
through unchanged. Without expert parallelism their rows still run through the last expert (at most
the dropped count of extra rows) and are then masked out, so no sync is needed to cut them off and no
grouped kernel sees rows outside its groups; with expert parallelism they are not sent.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from . import parallel
from ._permute import _Dispatch, _Permute
from .experts import GroupedExperts
from .router import RouterConfig, TopKRouter

__all__ = ["MoE", "moe_layers", "moe_losses"]


class MoE(nn.Module):
    """Top-k routed mixture of E MLP experts: ``forward(x_...D) -> y_...D`` (same shape).

    The router's losses of the last forward are ``aux_loss`` and ``z_loss`` (add :func:`moe_losses` of the
    model to the training loss); statistics of the last forward are kept as tensors (no host sync) and
    read by :meth:`statistics`.

    Args:
        d_model: D, the input and output width.
        d_hidden: F, each expert's hidden width.
        num_experts: E.
        k: experts per token.
        activation: ``"swiglu"`` (default) or ``"gelu"``.
        bias: experts with biases.
        router: a :class:`RouterConfig` (its ``num_experts`` and ``k`` must match), or None.
        ep_group: the expert-parallel process group (None: no expert parallelism). Each of its P ranks
            holds ``num_experts / P`` experts (global ids ``rank * E/P ...``); every rank routes its own
            tokens, exchanges them with ``all_to_all_single`` and gets their outputs back. Every rank of
            the group must call forward (and backward) together.
        **router_fields: fields of :class:`RouterConfig` (``capacity_factor=``, ``dropless=`` ...).

    Raises:
        ValueError: ``k`` > ``num_experts``, a capacity factor <= 0, ``num_experts`` not divisible by the
            expert-parallel size, any other bad field, naming it.

    Example::

        >>> layer = MoE(64, 128, num_experts=4, k=2, dropless=True)
        >>> layer(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *,
                 activation: Literal["swiglu", "gelu"] = "swiglu", bias: bool = False,
                 router: RouterConfig | None = None, ep_group: Any = None, **router_fields: Any) -> None:
        super().__init__()
        if router is not None:
            if router_fields:
                raise ValueError("give `router` or its fields as keywords, not both")
            if (router.num_experts, router.k) != (num_experts, k):
                raise ValueError(f"`router` has num_experts={router.num_experts}, k={router.k} but the layer has "
                                 f"num_experts={num_experts}, k={k}")
        else:
            router = RouterConfig(num_experts=num_experts, k=k, **router_fields)
        self.ep_group = ep_group
        self.ep_size, self.ep_rank = 1, 0
        if ep_group is not None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("`ep_group` needs torch.distributed to be initialised")
            self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        if isinstance(num_experts, int) and num_experts % self.ep_size:
            raise ValueError(f"`num_experts`={num_experts} must be divisible by the expert-parallel size "
                             f"{self.ep_size} (the size of `ep_group`)")
        self.router = TopKRouter(d_model, router)
        self.num_local_experts = num_experts // self.ep_size
        self.experts = GroupedExperts(self.num_local_experts, d_model, d_hidden, activation, bias)
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self._stats: dict[str, torch.Tensor] = {}

    @property
    def config(self) -> RouterConfig:
        return self.router.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension must equal `d_model`={self.d_model}, got shape {tuple(x.shape)}")
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T, K, E = x_TD.shape[0], self.k, self.num_experts
        r = self.router(x_TD)
        # assignments dropped by capacity get expert id E: sorted last, outside every group
        expert_N = torch.where(r.kept_TK, r.indices_TK, E).reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        inv_N = torch.empty_like(order_N)
        inv_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        expert_S = expert_N[order_N]
        # group ends by binary search over the sorted ids: no host sync (torch.bincount reads its max on the host)
        offs_E = torch.searchsorted(expert_S, torch.arange(1, E + 1, device=expert_S.device)).to(torch.int32)
        x_SD = _Dispatch.apply(x_TD, order_N, inv_N, K)
        if self.ep_size > 1:
            y_SD = parallel.expert_parallel_forward(self.experts, x_SD, offs_E, self.ep_group, self.ep_size)
        else:
            # the dropped rows (sorted last) join the last expert's group and are masked out below: every
            # row lies in a group, so no grouped kernel leaves an output or input-gradient row unwritten
            offs_all_E = offs_E.clone()
            offs_all_E[-1:].fill_(expert_N.numel())  # a fill kernel: an indexed assignment would copy from the host
            y_SD = self.experts(x_SD, offs_all_E, expert_S)
        y_TKD = _Permute.apply(y_SD, inv_N, order_N).view(T, K, y_SD.shape[-1])
        y_TKD = torch.where(r.kept_TK.unsqueeze(-1), y_TKD, y_TKD.new_zeros(()))  # dropped: zero, no gradient
        acc = torch.promote_types(x.dtype, torch.float32)  # combine in fp32 (fp64 for fp64 inputs)
        y_TD = (y_TKD.to(acc) * r.gates_TK.to(acc).unsqueeze(-1)).sum(dim=1).to(x.dtype)
        self.aux_loss, self.z_loss = r.aux_loss, r.z_loss
        with torch.no_grad():
            p = r.probs_TE
            entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean() if T else p.new_zeros(())
            self._stats = {
                "load": r.counts_E.float() / max(T * K, 1),
                "dropped": (~r.kept_TK).sum().float(),
                "assignments": torch.tensor(float(T * K)),
                "tokens_dropped": (~r.kept_TK).all(dim=1).sum().float(),
                "entropy": entropy.float(),
                "aux_loss": r.aux_loss.detach().float(),
                "z_loss": r.z_loss.detach().float(),
                "tokens": torch.diff(offs_E, prepend=offs_E.new_zeros(1)),
            }
        return y_TD.view(shape)

    def statistics(self, prefix: str = "moe") -> dict[str, float]:
        """The last forward's routing: ``{prefix}/load_e{i}`` (fraction of assignments to expert i before
        capacity), ``imbalance`` (max/mean load), ``drop_rate`` (dropped assignments / assignments),
        ``token_drop_rate`` (tokens with every assignment dropped), ``aux_loss``, ``z_loss``, ``entropy``
        (mean router entropy, nats). Empty before the first forward. Reading it syncs with the device."""
        s = self._stats
        if not s:
            return {}
        load = s["load"].tolist()
        mean = sum(load) / len(load)
        n = float(s["assignments"])
        out = {f"{prefix}/load_e{i}": float(v) for i, v in enumerate(load)}
        out[f"{prefix}/imbalance"] = max(load) / mean if mean > 0 else 0.0
        out[f"{prefix}/drop_rate"] = float(s["dropped"]) / n if n else 0.0
        out[f"{prefix}/token_drop_rate"] = float(s["tokens_dropped"]) * self.k / n if n else 0.0
        for key in ("aux_loss", "z_loss", "entropy"):
            out[f"{prefix}/{key}"] = float(s[key])
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a state with all E experts stacked (written at expert-parallel size 1, or gathered by
        # ``globalize``-ing hooks such as the demo's) loads at any expert-parallel size: keep this rank's slice
        # (of the parameters, and of the experts' stacked buffers: dynamic sparsity's masks)
        if self.ep_size > 1:
            ids = self.local_expert_ids()
            stacked = [*self.experts.named_parameters(), *self.experts.named_buffers()]
            for pname, p in stacked:
                key = f"{prefix}experts.{pname}"
                t = state_dict.get(key)
                if isinstance(t, torch.Tensor) and t.dim() == p.dim() and t.shape[0] == self.num_experts \
                        and t.shape[1:] == p.shape[1:]:
                    state_dict[key] = t[ids.start:ids.stop]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def tokens_per_expert(self) -> torch.Tensor | None:
        """Assignments of this rank's tokens that the last forward sent to each of the E experts after
        capacity (int32 ``[E]``, on the device, no host sync; None before the first forward). Read only."""
        return self._stats.get("tokens")

    def local_expert_ids(self) -> range:
        """The global ids of the experts this rank holds (all of them without expert parallelism)."""
        n = self.num_local_experts
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    def extra_repr(self) -> str:
        ep = f", ep_size={self.ep_size}" if self.ep_size > 1 else ""
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}{ep}"


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every :class:`MoE` layer of ``model`` by qualified name (a DDP wrapper stands for its module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def moe_losses(model: nn.Module) -> torch.Tensor:
    """The sum over every MoE layer of its last forward's ``aux_loss + z_loss`` (0 when none ran).

    Each term is already scaled by its coefficient and is a mean over the layer's tokens of this
    micro-batch; add the result to the training loss of the same micro-batch (docs/moe.md: the
    normalisations).
    """
    total: torch.Tensor | None = None
    for layer in moe_layers(model).values():
        for loss in (layer.aux_loss, layer.z_loss):
            if loss is not None:
                total = loss if total is None else total + loss
    if total is None:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total
