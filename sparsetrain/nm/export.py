"""The exact N:M "exported view" of a state dict or a checkpoint (pure functions, no model needed).

During training the checkpoint holds the live dense weights under
``<layer>.parametrizations.weight.original`` and the masks in the sparsifier's state. The
exported view is what the trained network computes with: plain ``<layer>.weight`` keys holding
``where(mask, W, 0)``, exactly N:M along the reduction dim, with ``-0.0`` turned into ``+0.0``.
It loads into the plain model, and it is what a 2:4 export (compressed or semi-structured
tensors) starts from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

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
    return torch.where(mask, weight.detach(), 0.0) + 0.0  # + 0.0 maps -0.0 to +0.0


def nm_export_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    n: int,
    m: int,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    layers: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact N:M view of a state dict, with plain keys; the input is not modified.

    Every ``<layer>.parametrizations.weight.original`` (an N:M-trained layer's dense weight)
    becomes ``<layer>.weight = where(mask, W, 0)`` where ``mask`` is ``masks[layer]`` when given
    (the mask the forward pass used) and otherwise the magnitude N:M mask of ``W``; the other
    ``<layer>.parametrizations.weight.*`` entries are dropped. With ``layers``, only those layers
    are converted, and a layer named there with a plain ``<layer>.weight`` (e.g. a dense
    checkpoint) is pruned to N:M by magnitude. All other entries are passed through (same tensors).

    Args:
        state_dict: a model's (or a LightningModule's) state dict.
        n: kept per group.
        m: group size along the reduction dim.
        masks: bool masks by layer name (module path without ``.weight``).
        layers: restrict the conversion to these layer names.

    Returns:
        A new dict that loads into the plain model.

    Raises:
        ValueError: bad ``n``/``m``, a layer's reduction dim is not a multiple of ``m``, a mask of
            the wrong shape or pattern, or a name in ``layers`` with no weight in ``state_dict``.

    Example::

        >>> from sparsetrain.demo import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=1, d_model=64, n_head=1))
        >>> sd = nm_export_state_dict(model.state_dict(), 2, 4, layers=["blocks.0.mlp.fc_in"])
        >>> bool((sd["blocks.0.mlp.fc_in.weight"].reshape(-1, 4) != 0).sum(-1).le(2).all())
        True
    """
    check_nm(n, m)
    masks = dict(masks or {})
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        have = {k[: -len(_ORIG)] for k in state_dict if k.endswith(_ORIG)}
        have |= {k[: -len(".weight")] for k in state_dict if k.endswith(".weight")}
        missing = sorted(wanted - have)
        if missing:
            raise ValueError(f"`layers` names layers with no weight in `state_dict`: {', '.join(missing)}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_ORIG):
            layer = key[: -len(_ORIG)]
            if wanted is None or layer in wanted:
                out[layer + ".weight"] = nm_exact(value, n, m, masks.get(layer))
                continue
        elif _PARAM_PREFIX in key:
            layer = key.split(_PARAM_PREFIX)[0]
            if wanted is None or layer in wanted:
                continue
        elif wanted is not None and key.endswith(".weight") and key[: -len(".weight")] in wanted:
            layer = key[: -len(".weight")]
            out[key] = nm_exact(value, n, m, masks.get(layer))
            continue
        out[key] = value
    return out


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
            masks = {name: unpack_mask(packed, st["mask_shapes"][name]) for name, packed in st["masks"].items()}
        sd = nm_export_state_dict(sd, n, m, masks=masks, layers=st["layers"])
    return sd
