"""Registry of the components a recipe may list under ``callbacks:``.

A component is a callable (a Lightning callback class, usually) named in a recipe::

    callbacks:
      - name: dynamic_sparsity
        method: rigl
        sparsity: 0.8

Every key but ``name`` is a keyword argument of the callable. Recipes are checked
against the callable's signature before training starts: an unknown key, a value of
the wrong type, or a value the callable itself rejects (its ``ValueError``) fails
with the key path, e.g. ``callbacks[1].sparsity``.

Components are registered by import path, so registering one imports nothing:
the core stays free of Lightning until a recipe actually uses a callback.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

__all__ = ["RecipeError", "available_components", "build_component", "check_value", "component_class",
           "register_component"]


class RecipeError(ValueError):
    """A recipe is invalid; the message starts with the key path of the offending value."""


_REGISTRY: dict[str, str] = {
    # name: "module:attribute"; each capability adds its line here.
    "nm_sparsity": "sparsetrain.callbacks.nm_sparsity:NMSparsity",
    "dynamic_sparsity": "sparsetrain.callbacks.dynamic_sparsity:DynamicSparsity",
    "gradient_compression": "sparsetrain.callbacks.compression:GradientCompression",
    "moe_monitor": "sparsetrain.callbacks.moe:MoEMonitor",
}


def register_component(name: str, target: str | Callable[..., Any]) -> None:
    """Make ``name`` usable under ``callbacks:`` in recipes.

    Args:
        name: the name recipes use.
        target: the callable, or its import path ``"package.module:Attribute"``.

    Raises:
        ValueError: ``name`` is empty or not an identifier, or ``target`` is a string
            without ``":"``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be an identifier, got {name!r}")
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError(f"`target` must look like 'package.module:Attribute', got {target!r}")
        _REGISTRY[name] = target
    elif callable(target):
        _REGISTRY[name] = target  # type: ignore[assignment]
    else:
        raise ValueError(f"`target` must be a callable or an import path string, got {type(target).__name__}")


def available_components() -> list[str]:
    """Names accepted under ``callbacks:``, sorted."""
    return sorted(_REGISTRY)


def component_class(name: str) -> Callable[..., Any]:
    """The callable registered as ``name`` (imported now).

    Raises:
        RecipeError: ``name`` is not registered.
    """
    if name not in _REGISTRY:
        known = ", ".join(available_components()) or "(none registered)"
        raise RecipeError(f"unknown component {name!r}; available: {known}")
    return _resolve(name)


def _resolve(name: str) -> Callable[..., Any]:
    target = _REGISTRY[name]
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float).

    Supports the annotations configs use: bool, int, float, str, None, Literal, unions
    (``X | None``), ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and ``Any``.

    Raises:
        RecipeError: naming ``path``, the value and the allowed type.
    """
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise RecipeError(f"{path}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    if origin in (Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if value is None and len(non_null) < len(args):
            return None
        if len(non_null) == 1:  # `X | None`: report X's own, more precise, error
            return check_value(value, non_null[0], path)
        for a in args:
            try:
                return check_value(value, a, path)
            except RecipeError:
                continue
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item_tp = args[0] if args else Any
            items = [check_value(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    elif origin is dict:
        if isinstance(value, dict):
            val_tp = args[1] if len(args) == 2 else Any
            return {k: check_value(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise RecipeError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build_component(spec: dict[str, Any], path: str) -> Any:
    """Validate one ``callbacks:`` entry against its component and construct it.

    Args:
        spec: the entry, with ``name`` and the component's keyword arguments.
        path: its key path in the recipe, e.g. ``"callbacks[1]"``.

    Raises:
        RecipeError: unknown component or key, wrong type, or a value the component rejects.
    """
    if not isinstance(spec, dict):
        raise RecipeError(f"{path}: expected a mapping with a `name`, got {type(spec).__name__}")
    name = spec.get("name")
    if name is None:
        raise RecipeError(f"{path}.name: missing; one of {', '.join(available_components()) or '(none)'}")
    if name not in _REGISTRY:
        known = ", ".join(available_components()) or "(none registered)"
        raise RecipeError(f"{path}.name: unknown component {name!r}; available: {known}")
    target = _resolve(name)
    sig = inspect.signature(target)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    # A signature made from a config dataclass (the callbacks') carries resolved types of its own.
    hints.update({p.name: p.annotation for p in sig.parameters.values()
                  if p.annotation is not p.empty and not isinstance(p.annotation, str) and p.name not in hints})
    params = {
        p.name: p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    kwargs: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in params:
            raise RecipeError(
                f"{path}.{key}: unknown key for component {name!r}; allowed: {', '.join(sorted(params))}"
            )
        kwargs[key] = check_value(value, hints.get(key, Any), f"{path}.{key}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise RecipeError(f"{path}.{missing[0]}: required by component {name!r}")
    try:
        return target(**kwargs)
    except (ValueError, TypeError) as err:
        msg = str(err)
        key = next((k for k in kwargs if f"`{k}`" in msg or msg.startswith(k)), None)
        where = f"{path}.{key}" if key else path
        raise RecipeError(f"{where}: {msg}") from err
