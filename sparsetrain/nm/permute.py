"""Channel permutation for N:M pruning (Pool & Yu, "Channel Permutations for N:M Sparsity", NeurIPS 2021).

Which weights share a group of M depends on the order of a layer's input channels. Permuting the
input channels of a consumer layer and, the same way, the output channels of the layer that
produces them (its weight rows and bias) leaves the network's function unchanged, so the order
can be chosen to keep the most magnitude when pruning to N:M:

- an MLP: ``fc_out``'s input columns with ``fc_in``'s output rows (the activation between them
  is elementwise); likewise consecutive Linears of an ``nn.Sequential`` with elementwise
  activations between;
- attention: ``out_proj``'s input columns with ``v_proj``'s output rows, within each head (the
  attention weights of a head mix only that head's value channels). The Q/K permutation of the
  seed (the same order on Q's and K's channels, within heads, keeps ``Q K^T``) is supported by
  :func:`apply_channel_permutation` but gains nothing for weight N:M: it moves weight ROWS, and
  groups of M run along the columns, so it is not searched;
- the residual stream of a pre-norm GPT: the columns of every q/k/v_proj, fc_in and lm_head with
  the rows of every out_proj and fc_out, the embedding tables' channels and every LayerNorm's
  weight and bias (LayerNorm's mean and variance do not depend on the channel order).

The search (:func:`search_channel_permutation`) is the paper's greedy one: evaluate every swap
of two channels in different stripes of M columns, apply the best, repeat until no swap gains;
then escape the local optimum a bounded number of times ("bounded regressions"): from the best
order seen, make S/4 random swaps between stripes and climb again, keeping the best order seen.
Every swap is scored exactly and incrementally: with ``c_p`` the n-th largest magnitude left in
a row's stripe once position ``p`` leaves it, putting column ``q`` into ``p``'s slot gains
``sum_r relu(|W_rq| - c_p[r])`` plus the (non-positive) loss of removing ``p``; a swap's gain is
the sum of its two halves. After a swap only the two stripes involved are rescored. It is seeded and deterministic, and
:func:`permute_for_nm` checks that all ranks found the same permutations.

Legend: R rows of the stacked consumer weights, K their input channels, B a block of K searched
independently (a head, or all of K), S stripes of M in a block.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from .. import _gloo
from .export import nm_exact
from .masks import check_nm, kept_magnitude, select_nm_layers

__all__ = [
    "PermutationSite",
    "apply_channel_permutation",
    "find_permutation_sites",
    "permute_for_nm",
    "prune_to_nm",
    "search_channel_permutation",
]

_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)


# ---------------------------------------------------------------------------------------- search
def _stripe_scores(A_RB: torch.Tensor, n: int, m: int, stripes: Sequence[int]):
    """For the given stripes: kept magnitude per stripe, and per position ``const_p`` and ``c_p[r]``."""
    idx = torch.tensor([s * m + j for s in stripes for j in range(m)], device=A_RB.device)
    V_RSM = A_RB[:, idx].reshape(A_RB.shape[0], len(stripes), m)
    top_RSM, order_RSM = torch.sort(V_RSM, dim=-1, descending=True, stable=True)
    kept_RS = top_RSM[..., :n].sum(-1)
    rank_RSM = torch.empty_like(order_RSM)
    rank_RSM.scatter_(-1, order_RSM, torch.arange(m, device=A_RB.device).expand_as(order_RSM))
    in_top = rank_RSM < n
    # Removing a kept entry promotes the (n+1)-th largest; removing a dropped one changes nothing.
    base_RSM = torch.where(in_top, kept_RS.unsqueeze(-1) - V_RSM + top_RSM[..., n : n + 1], kept_RS.unsqueeze(-1))
    c_RSM = torch.where(in_top, top_RSM[..., n : n + 1], top_RSM[..., n - 1 : n])
    const = (base_RSM - kept_RS.unsqueeze(-1)).sum(0).reshape(-1)
    return kept_RS.sum(0), const, c_RSM.reshape(A_RB.shape[0], -1), idx


def _gain_rows(A_RB: torch.Tensor, const_P: torch.Tensor, c_RP: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``G[p, q] = const_p + sum_r relu(A[r, q] - c[r, p])`` for the positions p given, all q."""
    rows = []
    for i in range(0, c_RP.shape[1], chunk):
        c = c_RP[:, i : i + chunk]
        rows.append((A_RB.unsqueeze(1) - c.unsqueeze(-1)).clamp_min_(0).sum(0))
    return torch.cat(rows) + const_P.unsqueeze(-1)


def _search_block(A_RB: torch.Tensor, n: int, m: int, gen: torch.Generator, escapes: int,
                  max_swaps: int) -> tuple[torch.Tensor, dict[str, Any]]:
    R, B = A_RB.shape
    S = B // m
    if S < 2:
        return torch.arange(B), {"swaps": 0, "escapes": 0}
    stripe_of = torch.arange(B, device=A_RB.device) // m
    same = stripe_of.unsqueeze(0) == stripe_of.unsqueeze(1)
    st: dict[str, Any] = {}

    def reset(perm: torch.Tensor) -> None:
        A = A_RB[:, perm.to(A_RB.device)].clone()
        kept_S, const, c_RB, _ = _stripe_scores(A, n, m, range(S))
        G = _gain_rows(A, const, c_RB)
        D = G + G.T  # D[p, q]: gain of swapping the channels at positions p and q
        D.masked_fill_(same, float("-inf"))
        st.update(A=A, perm=perm.clone(), kept_S=kept_S, G=G, D=D)

    def do_swap(p: int, q: int) -> None:
        A, perm, G, D = st["A"], st["perm"], st["G"], st["D"]
        A[:, [p, q]] = A[:, [q, p]]
        perm[[p, q]] = perm[[q, p]]
        G[:, [p, q]] = G[:, [q, p]]
        touched = sorted({p // m, q // m})
        kept_t, const_t, c_t, idx = _stripe_scores(A, n, m, touched)
        st["kept_S"][touched] = kept_t
        G[idx] = _gain_rows(A, const_t, c_t)
        # Only entries in the touched stripes' rows and columns change (p and q are among them).
        rows = G[idx] + G[:, idx].T
        rows.masked_fill_(same[idx], float("-inf"))
        D[idx] = rows
        D[:, idx] = rows.T

    reset(torch.arange(B))
    tol = 1e-9 * float(st["kept_S"].sum().abs()) + 1e-30
    best_obj, best_perm = float(st["kept_S"].sum()), st["perm"].clone()
    swaps = used_escapes = 0
    kick = max(1, S // 4)
    while True:
        # Greedy climb: best swap until none gains.
        while swaps < max_swaps:
            flat = int(torch.argmax(st["D"]))
            if float(st["D"].view(-1)[flat]) <= tol:
                break
            do_swap(flat // B, flat % B)
            swaps += 1
        obj = float(st["kept_S"].sum())
        if obj > best_obj + tol:
            best_obj, best_perm = obj, st["perm"].clone()
        if used_escapes >= escapes or swaps >= max_swaps:
            break
        if obj < best_obj - tol:
            reset(best_perm)  # escape from the best order found, not from a worse optimum
        # Bounded regression: S/4 random swaps between stripes (a single swap is undone by the next
        # greedy step), then climb again.
        for _ in range(kick):
            p = int(torch.randint(B, (1,), generator=gen))
            q = int(torch.randint(B - m, (1,), generator=gen))
            q = q if q < (p // m) * m else q + m  # a position outside p's stripe
            do_swap(p, q)
        used_escapes += 1
    return best_perm, {"swaps": swaps, "escapes": used_escapes}


@torch.no_grad()
def search_channel_permutation(
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    block_size: int | None = None,
    seed: int = 0,
    escapes: int = 8,
    max_swaps: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Input-channel order of ``weight`` that keeps the most magnitude under an N:M mask.

    Greedy channel swaps with bounded random escapes (Pool & Yu 2021, section 4); the returned
    order never keeps less than the identity.

    Args:
        weight: ``[R, K]`` consumer weight(s) (several consumers of the same channels: concatenate
            their rows). Magnitudes are used.
        n: kept per group.
        m: group size; must divide ``block_size``.
        block_size: channels may move only within consecutive blocks of this size (attention
            heads); None = all of K.
        seed: seed of the random escapes.
        escapes: escapes per block after the first local optimum (each: S/4 random swaps from the
            best order so far, then a greedy climb).
        max_swaps: cap on greedy swaps per block (default ``16 * K / m``).
        device: where to search (default: ``weight``'s device). Float64 throughout.

    Returns:
        ``(perm, info)``: ``perm`` is a LongTensor with ``weight[:, perm]`` the permuted weight;
        ``info`` has ``kept_before``/``kept_after`` (fractions of ``sum |W|``), ``swaps``, ``escapes``.

    Raises:
        ValueError: bad ``n``/``m``, ``weight`` not 2-D, ``block_size`` not dividing K, or ``m`` not
            dividing ``block_size``.
    """
    check_nm(n, m)
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D [rows, channels], got shape {tuple(weight.shape)}")
    K = weight.shape[1]
    B = K if block_size is None else block_size
    if B < 1 or K % B:
        raise ValueError(f"`block_size` must divide the {K} channels, got {block_size}")
    if B % m:
        raise ValueError(f"`m`={m} must divide `block_size` ({B})")
    if escapes < 0:
        raise ValueError(f"`escapes` must be >= 0, got {escapes}")
    max_swaps = 16 * K // m if max_swaps is None else max_swaps
    if max_swaps < 0:
        raise ValueError(f"`max_swaps` must be >= 0, got {max_swaps}")
    dev = torch.device(device) if device is not None else weight.device
    A = weight.detach().to(dev, torch.float64).abs()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.empty(K, dtype=torch.long)
    info: dict[str, Any] = {"swaps": 0, "escapes": 0}
    for b0 in range(0, K, B):
        p, i = _search_block(A[:, b0 : b0 + B], n, m, gen, escapes, max_swaps)
        perm[b0 : b0 + B] = p.cpu() + b0
        info["swaps"] += i["swaps"]
        info["escapes"] += i["escapes"]
    info["kept_before"] = kept_magnitude(weight, n, m)
    info["kept_after"] = kept_magnitude(weight[:, perm.to(weight.device)], n, m)
    return perm, info


# ---------------------------------------------------------------------------------------- sites
@dataclass
class PermutationSite:
    """Layers that share one channel dimension: permuting it together keeps the function.

    Args:
        consumers: names of Linears whose INPUT channels (weight columns) are the dimension;
            the N:M groups of those selected for pruning are what the search optimises.
        producers: names of Linears whose OUTPUT channels (weight rows, bias) are the dimension.
        block_size: channels move only within blocks of this size (attention heads); None = free.
        others: ``(parameter name, dim)`` of further tensors indexed by the dimension, permuted along
            ``dim`` (embedding tables, LayerNorm weights and biases on a residual stream).
    """

    consumers: list[str]
    producers: list[str]
    block_size: int | None = None
    others: list[tuple[str, int]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"permutation sites must name nn.Linear layers, got {name!r} ({type(mod).__name__})")
    return mod


def _weight(mod: nn.Linear) -> torch.Tensor:
    """The trained weight tensor (the dense original when an N:M parametrization is attached)."""
    if parametrize.is_parametrized(mod, "weight"):
        return mod.parametrizations.weight.original
    return mod.weight


def _residual_site(model: nn.Module, prefix: str) -> PermutationSite | None:
    """The residual stream of a pre-norm GPT laid out like :class:`sparsetrain.demo.GPT`, or None.

    Its channels are written by the embeddings and every block's ``out_proj``/``fc_out`` rows and
    read by every LayerNorm (elementwise affine; mean and variance do not depend on the order),
    every ``q/k/v_proj`` and ``fc_in`` and ``lm_head``.
    """
    need = ("tok_emb", "pos_emb", "blocks", "ln_f", "lm_head")
    if not all(hasattr(model, a) for a in need):
        return None
    if not (isinstance(model.tok_emb, nn.Embedding) and isinstance(model.pos_emb, nn.Embedding)
            and isinstance(model.ln_f, nn.LayerNorm) and isinstance(model.lm_head, nn.Linear)):
        return None
    consumers, producers = [], []
    others = [(f"{prefix}tok_emb.weight", 1), (f"{prefix}pos_emb.weight", 1)]
    for i, block in enumerate(model.blocks):
        b = f"{prefix}blocks.{i}."
        parts = ("ln_1", "ln_2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.fc_in",
                 "mlp.fc_out")
        try:
            mods = {p: block.get_submodule(p) for p in parts}
        except AttributeError:
            return None
        if not all(isinstance(mods[p], nn.LayerNorm) for p in ("ln_1", "ln_2")):
            return None
        if not all(isinstance(mods[p], nn.Linear) for p in parts[2:]):
            return None
        consumers += [b + p for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")]
        producers += [b + "attn.out_proj", b + "mlp.fc_out"]
        for ln in ("ln_1", "ln_2"):
            others += [(f"{b}{ln}.{t}", 0) for t in ("weight", "bias") if getattr(mods[ln], t) is not None]
    others += [(f"{prefix}ln_f.{t}", 0) for t in ("weight", "bias") if getattr(model.ln_f, t) is not None]
    return PermutationSite(consumers=consumers + [prefix + "lm_head"], producers=producers, others=others)


def find_permutation_sites(model: nn.Module, *, residual: bool = True) -> list[PermutationSite]:
    """Sites found by structure: ``fc_in -> fc_out`` MLPs, ``v_proj -> out_proj`` attention (within
    heads, ``n_head`` read from the attention module), Linear -> elementwise activation(s) -> Linear
    runs inside ``nn.Sequential`` containers and, with ``residual``, the residual stream of a
    pre-norm GPT laid out like :class:`sparsetrain.demo.GPT` (``tok_emb``, ``pos_emb``, ``blocks[i]``
    with ``ln_1``/``attn``/``ln_2``/``mlp``, ``ln_f``, ``lm_head``).
    """
    sites = []
    if residual:
        for name, mod in model.named_modules():
            site = _residual_site(mod, f"{name}." if name else "")
            if site is not None:
                sites.append(site)
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(mod.named_children())
        if isinstance(children.get("fc_in"), nn.Linear) and isinstance(children.get("fc_out"), nn.Linear):
            sites.append(PermutationSite(consumers=[prefix + "fc_out"], producers=[prefix + "fc_in"]))
        if all(isinstance(children.get(k), nn.Linear) for k in ("v_proj", "out_proj")) and hasattr(mod, "n_head"):
            width = children["v_proj"].out_features
            sites.append(PermutationSite(consumers=[prefix + "out_proj"], producers=[prefix + "v_proj"],
                                         block_size=width // int(mod.n_head)))
        if isinstance(mod, nn.Sequential):
            items = list(children.items())
            for i, (pname, pmod) in enumerate(items):
                if not isinstance(pmod, nn.Linear):
                    continue
                j = i + 1
                while j < len(items) and isinstance(items[j][1], _ELEMENTWISE):
                    j += 1
                if j < len(items) and isinstance(items[j][1], nn.Linear):
                    sites.append(PermutationSite(consumers=[prefix + items[j][0]], producers=[prefix + pname]))
    return sites


@torch.no_grad()
def apply_channel_permutation(model: nn.Module, site: PermutationSite, perm: torch.Tensor) -> None:
    """Reorder a site's channels in place: consumer weight columns, producer weight rows and biases,
    and the ``others`` along their dims.

    Call before the optimizer is built (its state is not permuted).

    Raises:
        ValueError: a named layer is not an ``nn.Linear`` or its channel count differs from ``perm``.
    """
    perm = perm.long()
    for name in site.consumers:
        w = _weight(_linear(model, name))
        if w.shape[1] != perm.numel():
            raise ValueError(f"consumer {name!r} has {w.shape[1]} input channels, `perm` has {perm.numel()}")
        w.copy_(w[:, perm.to(w.device)])
    for name in site.producers:
        mod = _linear(model, name)
        w = _weight(mod)
        if w.shape[0] != perm.numel():
            raise ValueError(f"producer {name!r} has {w.shape[0]} output channels, `perm` has {perm.numel()}")
        w.copy_(w[perm.to(w.device)])
        if mod.bias is not None:
            mod.bias.copy_(mod.bias[perm.to(mod.bias.device)])
    for name, dim in site.others:
        t = model.get_parameter(name)
        if t.shape[dim] != perm.numel():
            raise ValueError(f"{name!r} has {t.shape[dim]} entries along dim {dim}, `perm` has {perm.numel()}")
        t.copy_(t.index_select(dim, perm.to(t.device)))


def _check_ranks_agree(perms: list[torch.Tensor], names: list[str]) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or not perms:
        return
    fp = torch.stack([(p * torch.arange(1, p.numel() + 1)).sum() for p in perms]).double()
    both = torch.cat([fp, -fp])
    if dist.get_backend() == "nccl":
        both = both.cuda()
    dist.all_reduce(_gloo.handed(both), op=dist.ReduceOp.MAX)
    _gloo.wait_for_release()
    k = len(perms)
    bad = [nm for nm, hi, lo in zip(names, both[:k].tolist(), (-both[k:]).tolist()) if hi != lo]
    if bad:
        raise RuntimeError(f"channel permutations differ across ranks for {', '.join(bad)}: the weights or the "
                           f"seed differ between ranks")


def permute_for_nm(
    model: nn.Module,
    n: int,
    m: int,
    *,
    sites: Sequence[PermutationSite] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    escapes: int = 8,
    max_swaps: int | None = None,
    device: torch.device | str | None = None,
    residual: bool = True,
) -> list[PermutationSite]:
    """Permute channels in place so that N:M pruning keeps more magnitude; the function is unchanged.

    For each site (found with :func:`find_permutation_sites` unless given) with consumers selected
    for pruning (``include``/``exclude`` as in :func:`~sparsetrain.nm.select_nm_layers`) and a
    channel count ``m`` divides, search an order for the selected consumers' N:M kept magnitude
    with :func:`search_channel_permutation` and apply it to the whole site. Use on a dense model
    before pruning and before building the optimizer. Deterministic for a seed; under
    ``torch.distributed`` the ranks' permutations are checked to be identical.

    Args:
        model: the dense model.
        n: kept per group.
        m: group size.
        sites: permutation sites; None = found by structure.
        include: fnmatch patterns of consumer layer names to optimise (None: all).
        exclude: fnmatch patterns of consumer layer names to skip.
        seed: seed of the random escapes (the same on every rank).
        escapes: bounded random escapes per block.
        max_swaps: cap on greedy swaps per block.
        device: where to search (default: the weights' device).
        residual: include the residual stream of a GPT-like model (see :func:`find_permutation_sites`),
            which reorders the channels read by q/k/v_proj, fc_in and lm_head.

    Returns:
        The sites permuted, each with ``info`` (``kept_before``, ``kept_after`` over the scored consumers,
        ``swaps``, ``escapes``, ``seconds``, ``perm``).

    Raises:
        ValueError: bad ``n``/``m`` or a site naming a non-Linear layer.
        RuntimeError: ranks found different permutations.

    Example::

        >>> from sparsetrain.demo import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=1, d_model=64, n_head=1))
        >>> done = permute_for_nm(model, 2, 4, escapes=0)
        >>> all(s.info["kept_after"] >= s.info["kept_before"] for s in done)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r} ({type(seed).__name__})")
    check_nm(n, m)
    sites = list(find_permutation_sites(model, residual=residual) if sites is None else sites)
    try:
        with warnings.catch_warnings():  # the skip warning belongs to whoever prunes or trains
            warnings.simplefilter("ignore")
            eligible = set(select_nm_layers(model, m, include, exclude))
    except ValueError:
        if include is not None or exclude is not None:
            raise
        eligible = set()
    bad = sorted({name for site in sites for name in site.consumers
                  if name in eligible and not bool(torch.isfinite(_weight(_linear(model, name))).all())})
    if bad:
        raise ValueError(f"the weights of layer(s) {', '.join(bad)} hold NaN or inf: no channel permutation can be "
                         "searched on them (nothing was permuted)")
    done, perms, names = [], [], []
    for i, site in enumerate(sites):
        consumers = [_linear(model, c) for c in site.consumers]
        for p in site.producers:
            _linear(model, p)
        scored = [mod for name, mod in zip(site.consumers, consumers) if name in eligible]
        if not scored:
            continue
        stacked = torch.cat([_weight(c).detach() for c in scored])

        block = site.block_size or stacked.shape[1]
        if block % m or stacked.shape[1] % block:
            continue
        t0 = time.perf_counter()
        perm, info = search_channel_permutation(stacked, n, m, block_size=site.block_size, seed=seed + i,
                                                escapes=escapes, max_swaps=max_swaps, device=device)
        info["seconds"] = time.perf_counter() - t0
        apply_channel_permutation(model, site, perm)
        info["perm"] = perm
        site.info = info
        done.append(site)
        perms.append(perm)
        names.append(",".join(site.consumers))
    _check_ranks_agree(perms, names)
    return done


@torch.no_grad()
def prune_to_nm(
    model: nn.Module,
    n: int,
    m: int,
    *,
    permute: bool = True,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    seed: int = 0,
    escapes: int = 8,
    max_swaps: int | None = None,
    residual: bool = True,
) -> dict[str, Any]:
    """One-shot magnitude pruning of a dense model to exact N:M, optionally after channel permutation.

    The usual start of fine-tuning a pretrained model in N:M (NVIDIA's train -> prune -> retrain
    workflow); continue with ``NMSparsifier(model, NMConfig(method="ste", update_every=0))`` to
    keep the masks fixed while fine-tuning.

    Args:
        model: the dense model (pruned in place).
        n: kept per group.
        m: group size.
        permute: run :func:`permute_for_nm` first.
        include: fnmatch patterns of layer names to prune (None: every Linear/Conv that takes ``m``).
        exclude: fnmatch patterns of layer names to keep dense.
        seed: seed of the permutation search.
        escapes: bounded random escapes of the search.
        max_swaps: cap on greedy swaps per block.
        residual: let the permutation reorder a GPT's residual stream too.

    Returns:
        ``{"layers": [...], "kept_magnitude": {layer: fraction}, "sites": [PermutationSite, ...]}``.

    Raises:
        ValueError: bad ``n``/``m`` or no layer can take the pattern.
    """
    check_nm(n, m)
    sites = permute_for_nm(model, n, m, include=include, exclude=exclude, seed=seed, escapes=escapes,
                           max_swaps=max_swaps, residual=residual) if permute else []
    layers = select_nm_layers(model, m, include, exclude)
    kept = {}
    for name, mod in layers.items():
        w = _weight(mod)
        kept[name] = kept_magnitude(w, n, m)
        w.copy_(nm_exact(w, n, m))
    return {"layers": list(layers), "kept_magnitude": kept, "sites": sites}
