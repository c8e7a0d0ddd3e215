"""The exact N:M "exported view" of a state dict or a checkpoint (pure functions, no model needed).

During training the checkpoint holds the live dense weights (under
``<layer>.parametrizations.weight.original``, or ``<layer>.weight`` when the weights are masked in
place) and the masks in the sparsifier's state (``NMSparsifier.masks()`` on a live one). The
exported view is what the trained network computes with: plain ``<layer>.weight`` keys holding
``where(mask, W, 0)``, exactly N:M along the reduction dim, with ``-0.0`` turned into ``+0.0``.
It loads into the plain model, and it is what a 2:4 export (compressed or semi-structured
tensors) starts from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import _warn, contract
from .masks import check_nm, nm_mask, reduction_dim, unpack_mask

__all__ = ["nm_export_checkpoint", "nm_export_state_dict", "nm_exact"]

_ORIG = ".parametrizations.weight.original"
_PARAM_PREFIX = ".parametrizations.weight."


def nm_exact(weight: torch.Tensor, n: int, m: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor holding ``where(mask, weight, 0)`` with no ``-0.0``: exactly N:M.

    Args:
        weight: Linear/Conv weight.
        n: kept per group.
        m: group size along the reduction dim.
        mask: the mask to apply; None computes the magnitude mask :func:`~sparsetrain.nm.nm_mask`.

    Raises:
        ValueError: bad ``n``/``m``, ``m`` does not divide the reduction dim, or ``mask`` has the
            wrong shape or keeps more than ``n`` of some group.
    """
    check_nm(n, m)
    if reduction_dim(weight) % m:
        raise ValueError(f"`m`={m} does not divide the reduction dim of a weight of shape {tuple(weight.shape)}")
    if mask is None:
        mask = nm_mask(weight, n, m)
    else:
        if mask.dtype != torch.bool or mask.shape != weight.shape:
            raise ValueError(f"`mask` must be a bool tensor of shape {tuple(weight.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(weight.device)
        if bool((mask.reshape(-1, m).sum(-1) > n).any()):
            raise ValueError(f"`mask` keeps more than {n} of {m} in some group; it is not an {n}:{m} mask")
    return contract.masked(weight.detach(), mask) + 0.0  # NaN-safe; + 0.0 maps -0.0 to +0.0


def nm_export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    n: int | None = None,
    m: int | None = None,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact N:M view of a state dict, with plain keys; the input is not modified.

    The weights converted are those ``masks`` names, those ``layers`` names, and (with neither
    naming them) every parametrized weight ``<layer>.parametrizations.weight.original``. Each
    becomes ``<layer>.weight = where(mask, W, 0)`` (no ``-0.0``), where ``W`` is the layer's dense
    weight in the state dict, under either key the masking strategies write
    (``<layer>.parametrizations.weight.original`` or ``<layer>.weight``), and ``mask`` is
    ``masks["<layer>.weight"]`` when given (the mask the forward pass used: pass
    ``sparsifier.masks()``) and otherwise the magnitude N:M mask of ``W``. The other
    ``<layer>.parametrizations.weight.*`` entries of a converted layer are dropped; every other
    entry is passed through (same tensors).

    A call that would convert nothing is refused: the state dict of an ``inplace`` sparsifier's
    model holds its dense weights under plain ``<layer>.weight`` keys, which cannot be told from
    dense layers' without ``masks`` or ``layers``.

    Args:
        state_dict: a model's (or a LightningModule's) state dict.
        n: kept per group; with ``m``, each mask is checked to be ``n:m`` (required for the
            weights without a mask, which get the magnitude mask).
        m: group size along the reduction dim.
        masks: bool masks by parameter name (``"<layer>.weight"``, as ``NMSparsifier.masks()``
            gives them). Keys by layer name (the previous API) still work and warn.
        layers: layer names (module paths without ``.weight``) to convert: a layer named here
            without a mask gets the magnitude mask, also from a plain ``<layer>.weight`` (e.g. a
            dense checkpoint).

    Returns:
        A new dict that loads into the plain model.

    Raises:
        ValueError: bad ``n``/``m`` (or missing where a magnitude mask is needed), a layer's
            reduction dim is not a multiple of ``m``, a mask of the wrong shape or pattern, a name
            in ``masks`` or ``layers`` with no weight in ``state_dict``, or nothing to convert.

    Example::

        >>> from sparsetrain.demo import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=1, d_model=64, n_head=1))
        >>> sd = nm_export_state_dict(model.state_dict(), 2, 4, layers=["blocks.0.mlp.fc_in"])
        >>> bool((sd["blocks.0.mlp.fc_in.weight"].reshape(-1, 4) != 0).sum(-1).le(2).all())
        True
    """
    if (n is None) != (m is None):
        raise ValueError(f"pass both `n` and `m` or neither, got n={n!r}, m={m!r}")
    if n is not None:
        check_nm(n, m)

    def source(layer: str) -> str | None:  # the key holding the layer's dense weight
        for key in (layer + _ORIG, layer + ".weight"):
            if key in state_dict:
                return key
        return None

    by_layer: dict[str, torch.Tensor] = {}
    legacy = []
    for key, mask in (masks or {}).items():
        if key.endswith(".weight") and source(key[: -len(".weight")]) is not None:
            by_layer[key[: -len(".weight")]] = mask
        elif source(key) is not None:
            legacy.append(key)
            by_layer[key] = mask
        else:
            raise ValueError(f"`masks` names {key!r}, which has no weight in `state_dict` (keys are parameter names "
                             f"such as 'blocks.0.mlp.fc_in.weight')")
    if legacy:
        _warn.warn(f"`masks` keyed by layer name ({legacy[0]!r}) is deprecated; key them by parameter name "
                      f"('{legacy[0]}.weight'), as NMSparsifier.masks() does", FutureWarning, stacklevel=2)
    wanted = list(by_layer)
    if layers is not None:
        layers = list(layers)
        missing = sorted(layer for layer in layers if source(layer) is None)
        if missing:
            raise ValueError(f"`layers` names layers with no weight in `state_dict`: {', '.join(missing)}")
        wanted += [layer for layer in layers if layer not in by_layer]
    else:
        wanted += [k[: -len(_ORIG)] for k in state_dict if k.endswith(_ORIG) and k[: -len(_ORIG)] not in by_layer]
    if not wanted:
        raise ValueError("nothing to export: `state_dict` holds no parametrized N:M weight and neither `masks` nor "
                         "`layers` names one (a model masked in place keeps plain `<layer>.weight` keys); pass "
                         "masks=sparsifier.masks(), or use sparsifier.exported_state_dict()")
    if n is None and any(layer not in by_layer for layer in wanted):
        raise ValueError("`n` and `m` are needed for the weights without a mask (they get the magnitude mask)")
    convert = {source(layer): layer for layer in wanted}
    converted = set(wanted)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        layer = convert.get(key)
        if layer is not None:
            out[layer + ".weight"] = _exact(value, n, m, by_layer.get(layer))
        elif _PARAM_PREFIX in key and key.split(_PARAM_PREFIX)[0] in converted:
            continue  # the converted layer's other parametrization entries
        elif key not in out:
            out[key] = value
    return out


def _exact(weight: torch.Tensor, n: int | None, m: int | None, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`nm_exact`, or (no pattern given) ``where(mask, W, 0)`` without ``-0.0`` and no pattern check."""
    if n is not None:
        return nm_exact(weight, n, m, mask)
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"`mask` must be a bool tensor of shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return contract.masked(weight.detach(), mask.to(weight.device)) + 0.0


def nm_export_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Exact N:M view of a Lightning checkpoint written with :class:`sparsetrain.callbacks.NMSparsity`.

    Reads each ``NMSparsity`` state in ``checkpoint["callbacks"]`` (pattern, layers, the masks
    in force at save time) and converts ``checkpoint["state_dict"]`` with
    :func:`nm_export_state_dict`. Masks saved during an SDGF stage denser than the target are
    not the target's, so those layers get the magnitude mask of their dense weight instead.

    Args:
        checkpoint: the loaded checkpoint (``torch.load(path, weights_only=True)``).

    Raises:
        ValueError: the checkpoint holds no ``NMSparsity`` state or no ``state_dict``.
    """
    states = [s for k, s in (checkpoint.get("callbacks") or {}).items()
              if isinstance(k, str) and k.startswith("NMSparsity") and isinstance(s, Mapping) and "layers" in s]
    if not states or "state_dict" not in checkpoint:
        raise ValueError("`checkpoint` holds no NMSparsity callback state (was it written with the callback?)")
    sd = dict(checkpoint["state_dict"])
    for st in states:
        n, m = int(st["n"]), int(st["m"])
        masks = {}
        if st.get("pattern") is not None and tuple(st["pattern"]) == (n, m):
            masks = {f"{name}.weight": unpack_mask(packed, st["mask_shapes"][name])
                     for name, packed in st["masks"].items()}
        sd = nm_export_state_dict(sd, n, m, masks=masks, layers=st["layers"])
    return sd
