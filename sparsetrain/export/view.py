"""What an export writes: the exact N:M view of a live model or a state dict, one tensor at a time.

A live model's sparse weights are read through the component contract: every component attached
to the model (:func:`sparsetrain.contract.attached`) gives its masks through ``masks()``, and each
masked weight is exported as :func:`sparsetrain.nm.nm_export_state_dict` computes it
(``where(mask, W, 0)`` with no ``-0.0``, from the dense weight under either key the N:M masking
modes write). A component that offers ``exported_state_dict()`` but has no mask for some of its
weights right now (an SDGF stage before the target pattern) is asked for that view instead. The
model and its masks are only read: the view is built from new tensors, layer by layer, when the
writer asks for it, so no second copy of the model is ever held.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import contract
from ..nm.export import nm_export_state_dict

__all__ = ["ExportView", "export_view"]

_ORIG = ".parametrizations.weight.original"
_PARAM = ".parametrizations.weight."


@dataclass
class ExportView:
    """The plain state dict an export writes, produced lazily.

    Attributes:
        keys: the plain model's state-dict keys, in order.
        masked: the weight keys that had a mask (the N:M layers, when it comes from a live model).
        linear: the weights of the model's ``nn.Linear`` layers (None for a state dict).
        model_class: the model's qualified class name (None for a state dict).
    """

    keys: list[str]
    masked: set[str]
    linear: set[str] | None
    model_class: str | None
    _state: Mapping[str, torch.Tensor] = field(repr=False)
    _masks: Mapping[str, torch.Tensor] = field(repr=False)
    _eager: dict[str, torch.Tensor] = field(repr=False)
    _source: dict[str, str] = field(repr=False)
    _prefix: str = ""

    def source(self, key: str) -> torch.Tensor:
        """The tensor ``key`` is computed from (same shape and dtype), without computing it."""
        key = self._prefix + key
        return self._state[self._source.get(key, key)]

    def get(self, key: str) -> torch.Tensor:
        """The exported tensor ``key`` (a new tensor for masked weights, the state's own otherwise)."""
        key = self._prefix + key
        if key in self._eager:
            return self._eager[key]
        if key in self._masks:
            src = self._source.get(key, key)
            return nm_export_state_dict({src: self._state[src]}, masks={key: self._masks[key]})[key]
        return self._state[key]


def export_view(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor] | None = None, prefix: str = "") -> ExportView:
    """The exact N:M view of a model (through its components' ``masks()``) or of a state dict.

    Args:
        model_or_state_dict: an ``nn.Module`` (a DDP wrapper stands for its module) or a state dict.
        masks: bool masks by parameter name (``"<layer>.weight"``, ``True`` = kept) to apply
            instead of the components' masks.
        prefix: keep only the entries whose key starts with ``prefix``, named without it
            (``"model."``: the network a LightningModule holds as ``self.model``).

    Raises:
        TypeError: the input is neither a module nor a mapping of tensors.
        ValueError: a mask names no weight, a parametrized weight has no mask, or no key starts
            with ``prefix``.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"`prefix` must be a string, got {prefix!r}")
    eager: dict[str, torch.Tensor] = {}
    linear = model_class = None
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        while isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        state = model.state_dict()
        model_class = f"{type(model).__module__}.{type(model).__qualname__}"
        linear = {f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        if masks is None:
            masks = {}
            owners = contract.claims(model)
            for component in contract.attached(model):
                got = component.masks()
                claimed = [name for name, owner in owners.items() if owner is component]
                if callable(getattr(component, "exported_state_dict", None)) and any(n not in got for n in claimed):
                    full = component.exported_state_dict()
                    eager.update({name: full[name] for name in claimed})
                    del full
                else:
                    masks.update(got)
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise TypeError(f"`model_or_state_dict` must map names to tensors; entry {bad!r} is "
                            f"{type(state[bad]).__name__}")
    else:
        raise TypeError(f"`model_or_state_dict` must be an nn.Module or a state dict, got "
                        f"{type(model_or_state_dict).__name__}")
    masks = dict(masks or {})
    for key, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"`masks[{key!r}]` must be a bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is None or (key not in state and layer + _ORIG not in state):
            raise ValueError(f"`masks` names {key!r}, which is no weight of the model (keys are parameter names "
                             f"such as 'blocks.0.mlp.fc_in.weight')")
    keys: list[str] = []
    source: dict[str, str] = {}
    parametrized = {k[: -len(_ORIG)] for k in state if k.endswith(_ORIG)}
    for k in state:
        if k.endswith(_ORIG):
            key = k[: -len(_ORIG)] + ".weight"
            if key not in masks and key not in eager:
                raise ValueError(f"{key!r} is parametrized but has no mask: pass `masks`, or export the plain "
                                 "model (after the sparsifier's remove())")
            source[key] = k
            keys.append(key)
        elif _PARAM in k and k.split(_PARAM)[0] in parametrized:
            continue
        elif k not in source:
            keys.append(k)
    if prefix:
        if model_class is not None:
            try:
                sub = model.get_submodule(prefix.rstrip("."))
                model_class = f"{type(sub).__module__}.{type(sub).__qualname__}"
            except AttributeError:
                pass
        if not any(k.startswith(prefix) for k in keys):
            raise ValueError(f"`prefix` {prefix!r} starts no key of the model (keys such as {keys[0]!r})"
                             if keys else "the model has no state")
        n = len(prefix)
        keys = [k[n:] for k in keys if k.startswith(prefix)]
        masked = {k[n:] for k in set(masks) | set(eager) if k.startswith(prefix)}
        linear = None if linear is None else {k[n:] for k in linear if k.startswith(prefix)}
    else:
        masked = set(masks) | set(eager)
    return ExportView(keys=keys, masked=masked, linear=linear, model_class=model_class,
                      _state=state, _masks=masks, _eager=eager, _source=source, _prefix=prefix)
