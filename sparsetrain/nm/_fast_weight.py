"""The one place that relies on ``torch.nn.utils.parametrize`` internals: a faster ``weight`` property.

``register_parametrization`` gives a layer a class of its own whose ``weight`` property goes
through ``ParametrizationList.__call__``, which probes for further parametrizations with
``hasattr`` (a raised and caught ``AttributeError``) at every access. With one parametrization
that probing costs more host time than the masking itself, for every sparse layer in every
forward pass of an eager model. :func:`install` replaces that property, on the layer's own
class only, by one that reads the dense weight and calls the single parametrization directly;
inside ``parametrize.cached()`` it defers to the original property (parametrize's cache).
``remove_parametrizations`` restores the layer's plain class as before.

What it relies on, checked by :func:`supported` before installing (and pinned by
``tests/sparsetrain/nm/test_fast_weight.py``, which fails when torch changes any of it):

- ``parametrize._cache_enabled``, the flag ``parametrize.cached()`` sets;
- the parametrized class holds ``weight`` as a property in its own ``__dict__``;
- the layer's ``parametrizations`` (a ``ModuleDict``) holds a ``ParametrizationList`` under
  ``"weight"``, whose dense tensor is the parameter ``"original"`` and whose parametrizations are
  its submodules ``"0"``, ``"1"``, ...

Where any of it is missing, :func:`install` leaves the public property in place (with one
warning). The gain is measured by ``benchmarks/nm_weight_property.py`` (see
``benchmarks/results/nm.md``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import _warn

__all__ = ["dense_weight", "install", "installed", "supported", "uninstall"]

_WARNED: list[bool] = []


def supported(mod: nn.Module) -> bool:
    """Whether ``mod``'s parametrized ``weight`` has the layout :func:`install` relies on."""
    if not hasattr(parametrize, "_cache_enabled"):
        return False
    prop = type(mod).__dict__.get("weight")
    plists = mod.__dict__.get("_modules", {}).get("parametrizations")
    plist = None if plists is None else plists.__dict__.get("_modules", {}).get("weight")
    return (
        isinstance(prop, property)
        and isinstance(plist, parametrize.ParametrizationList)
        and isinstance(plist.__dict__.get("_parameters", {}).get("original"), torch.Tensor)
        and len(plist) == 1
        and plist.__dict__["_modules"].get("0") is plist[0]
    )


def install(mod: nn.Module) -> bool:
    """Make ``mod.weight`` call its single parametrization directly; returns whether it did.

    ``mod`` must have exactly one parametrization on ``weight``. Where torch's internals are not
    as expected (:func:`supported`), nothing is changed and one warning says so.
    """
    if not supported(mod):
        if not _WARNED:
            _WARNED.append(True)
            _warn.warn("torch.nn.utils.parametrize internals changed: N:M layers use the (slower) public "
                          "parametrized `weight` property", RuntimeWarning, stacklevel=2)
        return False
    cls = type(mod)
    original = cls.__dict__["weight"]

    def weight(self):
        if parametrize._cache_enabled:
            return original.fget(self)
        plist = self._modules["parametrizations"]._modules["weight"]
        return plist._modules["0"].forward(plist._parameters["original"])

    prop = property(weight, original.fset)
    prop.fget.__sparsetrain_original__ = original  # for uninstall()
    cls.weight = prop
    return True


def installed(mod: nn.Module) -> bool:
    """Whether :func:`install` replaced ``mod``'s ``weight`` property."""
    prop = type(mod).__dict__.get("weight")
    return isinstance(prop, property) and hasattr(prop.fget, "__sparsetrain_original__")


def uninstall(mod: nn.Module) -> None:
    """Put parametrize's own ``weight`` property back (the plain public path)."""
    if installed(mod):
        type(mod).weight = type(mod).__dict__["weight"].fget.__sparsetrain_original__


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The dense weight of a parametrized layer: ``mod.parametrizations.weight.original``, read from the
    module dicts directly where they hold it (this runs for every layer at every mask update)."""
    try:
        return mod._modules["parametrizations"]._modules["weight"]._parameters["original"]
    except (KeyError, AttributeError):
        return mod.parametrizations.weight.original
