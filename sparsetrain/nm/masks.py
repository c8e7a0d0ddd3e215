"""N:M masks along the GEMM reduction dimension, and the choice of layers that can take them.

An N:M pattern keeps at most ``n`` of every ``m`` consecutive weights along the reduction
(input) dimension K of a GEMM: the last dim of an ``nn.Linear`` weight ``[out, in]``, the
flattened ``c_in/groups * k_h * k_w`` of a convolution weight ``[out, c_in/groups, k_h, k_w]``
(Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
ICLR 2021; the layout cuSPARSELt and ``torch.sparse.to_sparse_semi_structured`` expect).

Legend: R rows (output channels), K reduction dim, G groups of ``m`` (G = R * K / m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import _warn, contract
from ..selection import select_topk_rows
from . import grouped

__all__ = [
    "check_nm",
    "forward_mask",
    "is_nm",
    "kept_magnitude",
    "nm_mask",
    "nm_masks",
    "pack_mask",
    "reduction_dim",
    "select_nm_layers",
    "unpack_mask",
]

# Above this group size the pairwise-rank kernel (m^2 elementwise passes) costs more than one sort.
_PAIRWISE_MAX_M = 16


def check_nm(n: int, m: int) -> None:
    """Validate an N:M pattern.

    Raises:
        ValueError: ``n`` or ``m`` is not an integer >= 1, or ``n >= m``.
    """
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}")
    if n >= m:
        raise ValueError(f"`n` must be < `m` (N:M keeps n of every m weights), got n={n}, m={m}")


def reduction_dim(weight: torch.Tensor) -> int:
    """Size K of the GEMM reduction dimension of a Linear/Conv weight (``numel / out_channels``).

    Raises:
        ValueError: ``weight`` has fewer than 2 dimensions.
    """
    if weight.dim() < 2:
        raise ValueError(f"`weight` must have >= 2 dims (out, in, ...), got shape {tuple(weight.shape)}")
    return math.prod(weight.shape[1:])


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """|weight| as ``[G, m]`` groups of consecutive reduction-dim entries; NaN ranks as largest."""
    k = reduction_dim(weight)
    if k % m:
        raise ValueError(f"the reduction dim of a weight of shape {tuple(weight.shape)} is {k}, "
                         f"not a multiple of `m`={m}")
    a = weight.detach().abs().reshape(-1, m)
    if a.is_floating_point():
        a = torch.nan_to_num(a, nan=float("inf"))
    return a


def _pairwise_keep(a_GM: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of ``[G, m]`` magnitudes: rank_i = #{j : a_j > a_i} + #{j < i : a_j == a_i} < n."""
    m = a_GM.shape[-1]
    rank_GM = torch.zeros(a_GM.shape, dtype=torch.uint8, device=a_GM.device)
    for j in range(m):
        a_j = a_GM[:, j : j + 1]
        rank_GM[:, : j + 1] += a_j > a_GM[:, : j + 1]
        rank_GM[:, j + 1 :] += a_j >= a_GM[:, j + 1 :]
    return rank_GM < n


def _broadcast_keep(w_GM: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`_pairwise_keep` of ``|w_GM|`` as one broadcast comparison (``[G, m, m]``, never
    materialised under ``torch.compile``: one pointwise kernel with an inner reduction of ``m``)."""
    m = w_GM.shape[-1]
    a_GM = w_GM.abs()
    if a_GM.is_floating_point():
        a_GM = torch.where(torch.isnan(a_GM), float("inf"), a_GM)
    a_i, a_j = a_GM.unsqueeze(-1), a_GM.unsqueeze(-2)  # [G, m, 1] (entry i), [G, 1, m] (rival j)
    idx = torch.arange(m, device=w_GM.device)
    earlier_MM = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i, the rival wins a tie
    beats_GMM = (a_j > a_i) | ((a_j == a_i) & earlier_MM)
    return beats_GMM.sum(-1) < n


def _eager_masks(weights, olds, n: int, m: int, compiled: bool = False):
    """Masks of ``weights`` and the number of entries that differ from ``olds`` (None where absent)."""
    news, flips = [], None
    for w, old in zip(weights, olds):
        if compiled:
            new = _broadcast_keep(w.detach().reshape(-1, m), n).reshape(w.shape)
        else:
            new = _pairwise_keep(_groups(w, m), n).reshape(w.shape)
        news.append(new)
        if old is not None:
            f = (new != old).sum()
            flips = f if flips is None else flips + f
    return news, flips


_COMPILED: dict[str, object] = {}


def _compiled_masks():
    key = "masks"
    if key not in _COMPILED:
        def fused(weights, olds, n, m):
            return _eager_masks(weights, olds, n, m, compiled=True)
        _COMPILED[key] = torch.compile(fused, dynamic=False)
    return _COMPILED[key]


def nm_masks(
    weights: Sequence[torch.Tensor],
    n: int,
    m: int,
    olds: Sequence[torch.Tensor | None] | None = None,
    *,
    compiled: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`nm_mask` of many weights at once, and how many entries changed from ``olds``.

    With ``compiled=True`` the whole list is done in one fused pass, with no per-layer Python
    dispatch and no host sync: on CUDA, where Triton is installed, by ONE Triton launch for all
    layers (:mod:`sparsetrain.nm.grouped`; the masks are then views of one flat buffer);
    elsewhere by one ``torch.compile`` graph in which each layer's mask (read ``|W|``, rank within
    groups, compare with the old mask, count flips) is one fused kernel. The masks are identical
    to :func:`nm_mask`'s (same ranks, same ties). If compilation fails the eager path runs
    instead, with one warning.

    Args:
        weights: Linear/Conv weights; ``m`` must divide each reduction dim.
        n: weights kept per group, ``1 <= n < m``.
        m: group size, at most 16 (the pairwise-rank kernel).
        olds: previous masks (or None entries) to count flips against; None for no count.
        compiled: fuse (a grouped Triton kernel on CUDA, else ``torch.compile``).

    Returns:
        ``(masks, flips)``: the bool masks, and a 0-dim int64 tensor on the weights' device with
        the number of entries that differ from ``olds`` (None when nothing was compared).

    Raises:
        ValueError: bad ``n``/``m``, ``m`` > 16, a weight whose reduction dim ``m`` does not divide,
            or ``olds`` of another length or shape.
    """
    masks, _, flips = _nm_masks(weights, n, m, olds, compiled, complements=False)
    return masks, flips


def _nm_masks(weights, n, m, olds, compiled, complements, check=True):
    """:func:`nm_masks`, and with ``complements`` each mask's ``~mask`` as a second list (what
    :class:`~sparsetrain.nm.methods.NMMask` computes with; None without). ``check=False`` skips
    the per-layer checks, for a caller that made them once (they cost host time every step)."""
    check_nm(n, m)
    if m > _PAIRWISE_MAX_M:
        raise ValueError(f"`m` must be <= {_PAIRWISE_MAX_M} for nm_masks, got {m}; use nm_mask")
    weights = list(weights)
    olds = [None] * len(weights) if olds is None else list(olds)
    if len(olds) != len(weights):
        raise ValueError(f"`olds` must hold one entry per weight ({len(weights)}), got {len(olds)}")
    for w, old in zip(weights, olds) if check else ():
        k = reduction_dim(w)
        if k % m:
            raise ValueError(f"the reduction dim of a weight of shape {tuple(w.shape)} is {k}, "
                             f"not a multiple of `m`={m}")
        if old is not None and (old.shape != w.shape or old.dtype != torch.bool or old.device != w.device):
            raise ValueError(f"`olds` entries must be bool masks of their weight's shape and device, got "
                             f"{old.dtype} {tuple(old.shape)} on {old.device} for {tuple(w.shape)} on {w.device}")
    every_old = all(o is not None for o in olds)
    if compiled and (every_old or all(o is None for o in olds)):
        with torch.no_grad():
            out = grouped.grouped_masks(weights, n, m, olds if every_old else None)
        if out is not None:
            return out
    if compiled and _COMPILED.get("masks_failed") is None:
        try:
            with torch.no_grad():
                masks, flips = _compiled_masks()(weights, olds, n, m)
                return masks, [~k for k in masks] if complements else None, flips
        except Exception as err:  # noqa: BLE001 - no working compiler here: fall back, once
            _COMPILED["masks_failed"] = True
            _warn.warn(f"N:M masks: torch.compile failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                          f"computing masks eagerly", stacklevel=2)
    with torch.no_grad():
        masks, flips = _eager_masks(weights, olds, n, m)
        return masks, [~k for k in masks] if complements else None, flips


def forward_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """:func:`nm_mask` of ``weight`` as a forward pass computes it (no checks, no gradient): while
    ``torch.compile`` traces, as one broadcast comparison that fuses with the ops reading the weight;
    eagerly, through the pairwise-rank passes. Both give :func:`nm_mask`'s mask."""
    w = weight.detach()
    if torch.compiler.is_compiling():
        return _broadcast_keep(w.reshape(-1, m), n).reshape(w.shape)
    if m <= _PAIRWISE_MAX_M and w.is_cuda:
        mask = grouped.one_mask(w, n, m)
        if mask is not None:
            return mask
    return _pairwise_keep(_groups(w, m), n).reshape(w.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, *, compiled: bool = False) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude weights of every ``m`` along the reduction dim.

    Exactly ``n`` entries per group are True, chosen by the ranking rule of
    :mod:`sparsetrain.selection` applied to ``|weight|`` with NaN counted as the largest
    magnitude: ties are broken towards the lower index, so the mask is a deterministic function
    of the weight and ranks holding identical weights compute identical masks.

    For ``m <= 16`` the rank of each entry within its group is counted with ``m`` vectorised
    comparison passes (elementwise, no per-group kernel launch; ``torch.topk`` launches a thread
    block per group); larger groups go through :func:`sparsetrain.selection.select_topk_rows`,
    one row per group. Both give the same mask.

    Args:
        weight: a Linear ``[out, in]`` or Conv ``[out, in/groups, *kernel]`` weight (any float dtype).
        n: weights kept per group, ``1 <= n < m``.
        m: group size; must divide the reduction dim.
        compiled: compute it under ``torch.compile`` (one fused kernel; see :func:`nm_masks`).

    Returns:
        Bool tensor of ``weight``'s shape and device.

    Raises:
        ValueError: bad ``n``/``m``, or ``m`` does not divide the reduction dim.

    Example::

        >>> w = torch.tensor([[0.1, -0.9, 0.3, 0.2]])
        >>> nm_mask(w, 2, 4)
        tensor([[False,  True,  True, False]])
    """
    check_nm(n, m)
    if compiled and m <= _PAIRWISE_MAX_M:
        return nm_masks([weight], n, m, compiled=True)[0][0]
    a_GM = _groups(weight, m)
    keep_GM = _pairwise_keep(a_GM, n) if m <= _PAIRWISE_MAX_M else select_topk_rows(a_GM, n)
    return keep_GM.reshape(weight.shape)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive reduction-dim entries holds at most ``n`` nonzeros."""
    check_nm(n, m)
    if reduction_dim(weight) % m:
        return False
    return bool(((weight.detach().reshape(-1, m) != 0).sum(-1) <= n).all())


def kept_magnitude(weight: torch.Tensor, n: int, m: int) -> float:
    """Fraction of ``sum |W|`` that an N:M mask of ``weight`` keeps (1.0 for an all-zero weight)."""
    a = weight.detach().abs().float()
    total = a.sum()
    if total == 0:
        return 1.0
    return float(torch.where(nm_mask(weight, n, m), a, 0.0).sum() / total)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask into ``uint8`` bytes, 8 entries per byte, little bit order (``numpy.packbits``)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * bits).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask` for a mask of ``shape``.

    Raises:
        ValueError: ``packed`` is not a uint8 tensor of ``ceil(numel / 8)`` bytes (a truncated or
            padded mask), or ``shape`` holds a negative size.
    """
    numel = 1
    for s in shape:
        if int(s) < 0:
            raise ValueError(f"`shape` must hold sizes >= 0, got {tuple(shape)}")
        numel *= int(s)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"`packed` must be a uint8 tensor from pack_mask, got {got}")
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"`packed` holds {packed.numel()} bytes, a mask of shape {tuple(shape)} packs into "
                         f"{(numel + 7) // 8}: the packed mask is truncated or belongs to another shape")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().reshape(tuple(shape))


def select_nm_layers(
    model: nn.Module,
    ms: int | Sequence[int],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The Linear/Conv layers of ``model`` that can take N:M sparsity, by qualified module name.

    The layers are chosen with the rule every component uses (:func:`sparsetrain.contract.select_layers`:
    ``nn.Linear`` and ``nn.Conv1d/2d/3d``, names matched with ``fnmatch.fnmatchcase``, ``include``
    then ``exclude``); of those, the ones whose reduction dim every ``m`` in ``ms`` divides are
    kept. Selected layers whose reduction dim does not divide are skipped with ONE warning that
    names them all.

    Args:
        model: the model.
        ms: the group size(s) the layers must accept (several for staged patterns).
        include: name patterns to select, e.g. ``["*.mlp.*"]``.
        exclude: name patterns to leave dense, e.g. ``["lm_head"]``.

    Returns:
        ``{name: module}`` in ``model.named_modules()`` order.

    Raises:
        ValueError: a pattern matches no Linear/Conv layer, or no selected layer can take ``m``.
    """
    ms = [ms] if isinstance(ms, int) else list(ms)
    selected = contract.select_layers(model, include=include, exclude=exclude or ())
    chosen, skipped = {}, []
    for name, mod in selected.items():
        k = reduction_dim(mod.weight)
        if any(k % m for m in ms):
            skipped.append(f"{name} (K={k})")
        else:
            chosen[name] = mod
    if not chosen:
        raise ValueError(f"`m`={'/'.join(map(str, ms))} divides the reduction dim of none of the selected "
                         f"layers: {', '.join(skipped) or '(none selected)'}")
    if skipped:
        _warn.warn(f"N:M sparsity (m={'/'.join(map(str, ms))}) skips {len(skipped)} layer(s) whose "
                      f"reduction dim is not a multiple of m; they stay dense: {', '.join(skipped)}",
                      stacklevel=3)
    return chosen
