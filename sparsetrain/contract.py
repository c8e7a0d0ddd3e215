"""The component contract: what every sparsetrain component offers, and the pieces they share.

Every component (gradient compression, dynamic sparsity, N:M sparsity; the MoE layer and the
sparsity-aware exchange follow) has the same lifecycle, written down in ``docs/architecture.md``:

- construction ``X(model, config=None, *, optimizer=None, process_group=None, **config_fields)``,
  the config a ``@dataclass(kw_only=True)`` validated in ``__post_init__``;
- ``step()`` after every optimizer step (the optimizer's step hook calls it when one is given);
- ``statistics() -> dict[str, float]``: flat, namespaced keys (``sparsity/global``), plain floats;
- ``masks() -> dict[str, Tensor]``: parameter name -> bool mask, ``{}`` for a component without masks;
- ``state_dict()`` / ``load_state_dict()``: versioned, rank-local, refusing a saved config that
  differs from the live one in a field that changes the math (:func:`check_config`);
- ``check_ranks()``: raises :class:`RankDivergenceError` when ranks disagree;
- ``remove()``: leaves a plain model.

Components find each other through the model they are attached to (:func:`attach`), never
through each other's private attributes:

- a layer's weight is claimed by at most one component that masks it (:func:`attach` refuses a
  second claim, naming the layer);
- :func:`gradient_masks` returns the masks outside which gradients are thrown away (dynamic
  sparsity's), with a version that changes whenever one of them changes; a component that keeps
  gradient state of its own (compression residuals and momenta) reads them and clears its state
  outside them at every new version, so no gradient reaches a pruned weight through it.

The shared pieces live here too: layer selection with one glob rule (:func:`select_layers`), the
cross-rank mask fingerprint (:func:`fingerprint`, :func:`check_in_sync`) and NaN-safe masking
(:func:`mask_`, :func:`masked`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from . import _gloo

__all__ = [
    "Component",
    "RankDivergenceError",
    "attach",
    "attached",
    "check_config",
    "check_in_sync",
    "claims",
    "detach",
    "fingerprint",
    "gradient_masks",
    "mask_",
    "masked",
    "select_layers",
]


class RankDivergenceError(RuntimeError):
    """State that must be identical on every rank (masks, schedules) differs; raised on every rank."""


@runtime_checkable
class Component(Protocol):
    """What every component offers (see ``docs/architecture.md``)."""

    #: True when gradients outside :meth:`masks` are thrown away (the weights stay zero there).
    masks_gradients: bool

    def step(self) -> Any: ...

    def statistics(self) -> dict[str, float]: ...

    def masks(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def check_ranks(self) -> None: ...

    def remove(self) -> None: ...


# ---------------------------------------------------------------------- the model's registry

_REGISTRY_ATTR = "_sparsetrain_components"


def _root(model: nn.Module) -> nn.Module:
    """The module components register on: a DDP wrapper's ``module``, else the model itself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class _Registry:
    """The components attached to one model, and the weights they claim (held weakly)."""

    def __init__(self) -> None:
        self.entries: list[tuple[weakref.ref, frozenset[str]]] = []

    def live(self) -> list[tuple[Any, frozenset[str]]]:
        out, kept = [], []
        for ref, names in self.entries:
            component = ref()
            if component is not None:
                out.append((component, names))
                kept.append((ref, names))
        self.entries = kept
        return out


def _registry(model: nn.Module, create: bool = False) -> _Registry | None:
    root = _root(model)
    reg = root.__dict__.get(_REGISTRY_ATTR)
    if reg is None and create:
        reg = _Registry()
        object.__setattr__(root, _REGISTRY_ATTR, reg)  # not a submodule, not a buffer: plain attribute
    return reg


def attach(model: nn.Module, component: Any, claimed: Iterable[str] = ()) -> None:
    """Register ``component`` on ``model``, claiming the parameters named in ``claimed``.

    Args:
        model: the model (a DDP wrapper stands for its module).
        component: the component; held weakly.
        claimed: parameter names (``"blocks.0.fc.weight"``) whose masking the component owns.

    Raises:
        ValueError: a parameter is already claimed by another component (naming the layer and both).
    """
    reg = _registry(model, create=True)
    assert reg is not None
    claimed = frozenset(claimed)
    for other, names in reg.live():
        if other is component:
            continue
        both = sorted(claimed & names)
        if both:
            raise ValueError(
                f"{type(component).__name__} and {type(other).__name__} both claim {both[0]!r}"
                f"{f' (and {len(both) - 1} more)' if len(both) > 1 else ''}: one layer can be masked by one "
                "component only; give them disjoint layers with `include` / `exclude`"
            )
    reg.entries = [(r, n) for r, n in reg.entries if r() is not component]
    reg.entries.append((weakref.ref(component), claimed))


def detach(model: nn.Module, component: Any) -> None:
    """Forget ``component`` (its :meth:`remove` calls this)."""
    reg = _registry(model)
    if reg is not None:
        reg.entries = [(r, n) for r, n in reg.entries if r() is not None and r() is not component]


def attached(model: nn.Module) -> list[Any]:
    """The components attached to ``model``, in order of attachment."""
    reg = _registry(model)
    return [] if reg is None else [c for c, _ in reg.live()]


def claims(model: nn.Module) -> dict[str, Any]:
    """Parameter name -> the component that claims it."""
    reg = _registry(model)
    return {} if reg is None else {n: c for c, names in reg.live() for n in sorted(names)}


def gradient_masks(model: nn.Module) -> tuple[tuple[int, ...], dict[str, torch.Tensor]]:
    """The masks outside which gradients are thrown away, and their version.

    Returns:
        ``(version, masks)``: ``masks`` maps parameter names to bool masks (live tensors: do not
        modify) of every attached component with ``masks_gradients``: its ``gradient_masks()``
        where it has one (Top-KAST: the backward set, larger than its ``masks()``), else its
        ``masks()``; ``version`` is a tuple
        that changes whenever any of them changes (compare it with the last one seen).
    """
    version: list[int] = []
    out: dict[str, torch.Tensor] = {}
    for component in attached(model):
        if getattr(component, "masks_gradients", False):
            version += [id(component), int(component.mask_version)]
            out.update(getattr(component, "gradient_masks", component.masks)())
    return tuple(version), out


# ---------------------------------------------------------------------- configs in checkpoints


def check_config(saved: dict[str, Any] | None, live: Any, math_fields: Sequence[str], what: str) -> None:
    """Refuse a saved config that differs from the live one in a field that changes the math.

    Args:
        saved: the config as saved (``dataclasses.asdict``), or None for a state saved without one.
        live: the live config dataclass.
        math_fields: the fields that change what is computed.
        what: the component, for the message.

    Raises:
        ValueError: naming the first differing field, the saved and the live value.
    """
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise ValueError(f"{what} state: `config` must be a dict, got {type(saved).__name__}")
    now = dataclasses.asdict(live)
    for name in math_fields:
        if name not in saved:
            continue
        a, b = saved[name], now.get(name)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            raise ValueError(
                f"{what} state was saved with {name}={saved[name]!r} but this run has {name}={now.get(name)!r}: "
                f"resume with the saved value, or start a fresh {what} state"
            )


# ---------------------------------------------------------------------- layer selection

#: Module classes whose ``weight`` components sparsify by default.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """The one glob rule: ``fnmatch.fnmatchcase`` of the qualified module name against any pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(value: Any, arg: str) -> tuple[str, ...] | None:
    """``include`` / ``exclude`` as a tuple of glob strings (None stays None).

    Raises:
        ValueError: a single string or anything but strings.
    """
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"`{arg}` must be a list of glob strings, got {value!r}")
    return tuple(value)


def select_layers(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = (),
    module_types: Sequence[type[nn.Module]] = LAYER_TYPES,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
) -> dict[str, nn.Module]:
    """The layers whose ``weight`` a component masks, by qualified name, in registration order.

    A module is a candidate when it is an instance of ``module_types`` with a ``weight`` tensor of
    at least 2 dimensions. ``include`` (if given) keeps the candidates whose name matches one of its
    globs (:func:`matches`); ``exclude`` then removes the matching ones; ``keep_first_dense`` /
    ``keep_last_dense`` finally drop the first / last remaining one.

    Raises:
        ValueError: a pattern matches no candidate (naming it and the candidates), or nothing is left.
    """
    include = check_patterns(include, "include")
    exclude = check_patterns(exclude, "exclude") or ()
    candidates = {
        name: m for name, m in _root(model).named_modules()
        if isinstance(m, tuple(module_types)) and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() >= 2
    }
    for arg, patterns in (("include", include or ()), ("exclude", exclude)):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in candidates):
                names = list(candidates)
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(f"`{arg}` pattern {p!r} matches no layer that can be sparsified; layers: "
                                 f"{shown or '(none)'}")
    selected = [n for n in candidates if (include is None or matches(n, include)) and not matches(n, exclude)]
    if keep_first_dense and selected:
        selected = selected[1:]
    if keep_last_dense and selected:
        selected = selected[:-1]
    if not selected:
        raise ValueError(
            "no layer left to sparsify: check `include`, `exclude`, `keep_first_dense`, `keep_last_dense` "
            f"(layers: {', '.join(candidates) or 'none'})"
        )
    return {n: candidates[n] for n in selected}


# ---------------------------------------------------------------------- cross-rank fingerprint


def fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """``[count, position hash]`` of a bool mask as int64 (equal masks give equal fingerprints)."""
    flat = mask.reshape(-1)
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    h = (idx * 2654435761 + 97) % 2147483629
    return torch.stack([flat.sum(dtype=torch.int64), torch.where(flat, h, 0).sum()])


def check_in_sync(fingerprints: dict[str, torch.Tensor], process_group: Any = None, *, what: str) -> None:
    """Compare per-name int64 fingerprints across ranks; raise on every rank if any differ.

    Args:
        fingerprints: name -> 1-D int64 tensor (the same names, in the same order, on every rank).
        process_group: the group (default: the default group).
        what: what is compared, for the message (``"masks after step 12"``).

    Raises:
        RankDivergenceError: naming the entries that differ.
    """
    if not fingerprints or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size(process_group) == 1:
        return
    rows = [f.reshape(-1).to(torch.int64) for f in fingerprints.values()]
    width = max(r.numel() for r in rows)
    local = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    if dist.get_backend(process_group) == "nccl" and local.device.type == "cpu":
        local = local.cuda()
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(_gloo.handed(lo, process_group), op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(_gloo.handed(hi, process_group), op=dist.ReduceOp.MAX, group=process_group)
    _gloo.wait_for_release()
    differ = (lo != hi).any(dim=1).tolist()
    if any(differ):
        bad = [name for name, d in zip(fingerprints, differ) if d]
        raise RankDivergenceError(
            f"{what} differ across ranks in {len(bad)} of {len(differ)}: "
            f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}"
        )


# ---------------------------------------------------------------------- NaN-safe masking

# Integer views of the same element size, for the CPU's bitwise path.
_BIT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}
_ZEROS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _zero(like: torch.Tensor) -> torch.Tensor:
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


class BitMasks:
    """Cache of masks as all-ones / all-zeros integers, for the CPU's bitwise masking.

    torch's bool-select kernel is not vectorised on the CPU (about 10x slower than a multiply);
    an AND of the float's bits with such an integer mask gives ``torch.where(mask, t, 0)`` bit for
    bit (a NaN or inf outside the mask becomes +0.0). An entry is rebuilt when its mask changes.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.dtype], tuple[tuple[int, int, int], torch.Tensor]] = {}

    def get(self, mask: torch.Tensor, int_dtype: torch.dtype) -> torch.Tensor:
        key = (id(mask), int_dtype)
        signature = (id(mask), mask.data_ptr(), mask._version)
        entry = self._cache.get(key)
        if entry is None or entry[0] != signature:
            entry = self._cache[key] = (signature, mask.to(int_dtype).neg_())
        return entry[1]

    def clear(self) -> None:
        self._cache.clear()


def mask_(t: torch.Tensor, mask: torch.Tensor, bits: BitMasks | None = None) -> torch.Tensor:
    """``t = torch.where(mask, t, 0)`` in place, NaN-safe (never ``t * mask``); returns ``t``.

    With ``bits`` on the CPU, the same result from an AND with a cached integer mask.
    """
    int_dtype = _BIT_VIEW.get(t.dtype) if (bits is not None and t.is_cpu) else None
    if int_dtype is None:
        torch.where(mask, t, _zero(t), out=t)
    else:
        t.view(int_dtype).bitwise_and_(bits.get(mask, int_dtype))
    return t


def masked(t: torch.Tensor, mask: torch.Tensor, bits: BitMasks | None = None) -> torch.Tensor:
    """``torch.where(mask, t, 0)`` as a new tensor, NaN-safe."""
    int_dtype = _BIT_VIEW.get(t.dtype) if (bits is not None and t.is_cpu) else None
    if int_dtype is None:
        return torch.where(mask, t, _zero(t))
    return torch.bitwise_and(t.view(int_dtype), bits.get(mask, int_dtype)).view(t.dtype)
