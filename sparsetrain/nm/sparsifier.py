"""The stateful N:M sparsifier: attaches masks to a model, steps the schedule, checkpoints, finalizes.

Plain-loop use::

    sparsifier = NMSparsifier(model, NMConfig(n=2, m=4, method="srste"))
    # with DDP: attach first (verify_now=False), then model = DDP(model); sparsifier.refresh()
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()            # once per optimizer step: schedule, masks, statistics
    sparsifier.remove()              # weights exactly N:M, plain ``weight`` parameters again

The schedule is :mod:`sparsetrain.nm.schedule`, the masking modes :mod:`sparsetrain.nm.strategies`.
The Lightning callback :class:`sparsetrain.callbacks.NMSparsity` drives the same object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import _warn, contract
from .config import NMConfig
from .export import nm_export_state_dict
from .masks import _nm_masks, nm_mask, pack_mask, select_nm_layers, unpack_mask
from .methods import NMMask
from .schedule import NMSchedule
from .strategies import MaskingStrategy, strategy_for

__all__ = ["NMConfig", "NMSparsifier"]

_STATE_VERSION = 2
#: The config fields that change what is computed: a state saved with other values is refused.
_MATH_FIELDS = ("n", "m", "method", "lambda_w", "update_every", "decay", "decay_steps", "stages", "include",
                "exclude")


class NMSparsifier:
    """Trains a model's Linear/Conv layers in an N:M pattern with dense weights underneath.

    Attaching sets up the masking strategy the config chooses (:mod:`sparsetrain.nm.strategies`;
    by default an :class:`~sparsetrain.nm.methods.NMMask` parametrization on each selected layer's
    ``weight``; the dense parameter object is kept, so an optimizer built before or after keeps
    working) and computes the masks from the current weights. Each
    :meth:`step` (call it once per optimizer step) advances the schedule, recomputes the masks
    when due (every ``update_every`` steps, and whenever the SDGF pattern changes) and records the
    fraction of mask entries that flipped. Masks are a deterministic function of the weights;
    under ``torch.distributed`` they are checked to be identical on every rank.

    Under DDP, attach to the plain module BEFORE wrapping it (DDP's gradient hooks must be
    registered on the parametrized weights; the parametrization re-seats the parameter), with
    ``verify_now=False`` if the ranks' initial weights may differ, and call :meth:`refresh` after
    wrapping: DDP broadcasts rank 0's weights when it wraps, and the masks must be recomputed
    from those.

    With ``NMConfig(inplace=True)`` no parametrization is registered: the layers' weights are
    masked in place after attaching (or at :meth:`refresh`, with ``verify_now=False``) and after
    every :meth:`step`, and :meth:`before_optimizer_step` puts the dense weights back before each
    optimizer step (see :class:`NMConfig`).

    It follows the component contract of ``docs/architecture.md``: it claims the selected layers'
    weights on the model (:func:`sparsetrain.contract.attach`; a layer claimed by another component
    is refused), :meth:`masks` gives the forward masks by parameter name, :meth:`statistics` the
    ``nm/...`` figures, :meth:`state_dict` is versioned and carries the config, :meth:`check_ranks`
    raises :class:`~sparsetrain.contract.RankDivergenceError`, and :meth:`remove` leaves a plain
    model. N:M keeps dense gradients by design (the straight-through estimator): its masks
    constrain the forward weight only (``masks_gradients = False``).

    Attributes:
        config: the :class:`NMConfig`.
        layers: the sparse layers by qualified module name.
        params: layer name -> its :class:`~sparsetrain.nm.NMMask` (holding the current mask).
        schedule: the :class:`~sparsetrain.nm.schedule.NMSchedule` (step, pattern, updates).
        strategy: the :class:`~sparsetrain.nm.strategies.MaskingStrategy` the config chose.
        mask_version: incremented at every change of the masks.
        last_flip_fraction: 0-dim device tensor, the fraction of mask entries that flipped at the
            last measured update (None before one).

    Args:
        model: the model (not yet wrapped in DDP).
        config: an :class:`NMConfig`; keyword arguments build one when omitted (not both).
        optimizer: when given, :meth:`step` runs after each ``optimizer.step()`` through
            ``optimizer.register_step_post_hook`` (a step skipped by a GradScaler is not counted),
            and :meth:`before_optimizer_step` before it (a step pre-hook; it acts with ``inplace``
            only); otherwise call them yourself around each optimizer step.
        grad_scaler: a ``torch.amp.GradScaler`` when training in fp16 with loss scaling: the
            SR-STE term is then multiplied by the current scale so it survives unscaling.
        process_group: group for the rank-equality check (default group when None).
        verify_now: check rank equality of the masks right away; pass False when the weights are
            not synchronised yet (e.g. before DDP wraps the model) and call :meth:`refresh` later.
        **kwargs: :class:`NMConfig` fields, when ``config`` is omitted.

    Raises:
        ValueError: bad config, no layer can take the pattern, a layer already has a
            parametrized ``weight`` or is claimed by another component, ``model`` is already
            wrapped in DDP, or (``inplace``) a sparse weight is shared with another module.
    """

    #: N:M masks the forward weight only; gradients stay dense (straight-through estimator).
    masks_gradients = False

    __slots__ = (
        # hyperparameters
        "config", "model", "grad_scaler", "process_group",
        # internal state
        "layers", "params", "schedule", "strategy", "_index", "_hooks", "_finalized", "mask_version",
        "__weakref__",
        # statistics
        "last_flip_fraction", "_flip_count", "_flip_total",
    )

    def __init__(self, model: nn.Module, config: NMConfig | None = None, *, optimizer: Any = None,
                 process_group: Any = None, grad_scaler: Any = None, verify_now: bool = True,
                 **kwargs: Any) -> None:
        if config is None:
            config = NMConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"pass either `config` or keyword arguments, not both (got {sorted(kwargs)})")
        if not isinstance(config, NMConfig):
            raise ValueError(f"`config` must be an NMConfig, got {type(config).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("`model` is already wrapped in DistributedDataParallel: attach the sparsifier to the "
                             "plain module before wrapping (DDP's gradient hooks must see the parametrized "
                             "weights), then call refresh() after wrapping")
        if not isinstance(verify_now, bool):
            raise ValueError(f"`verify_now` must be True or False, got {verify_now!r}")
        if optimizer is not None and not hasattr(optimizer, "register_step_post_hook"):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = config
        self.model = model
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.layers = select_nm_layers(model, config.ms, config.include, config.exclude)
        strategy_cls = strategy_for(config)
        # Claimed before the model is touched: a layer another component masks is refused as it is.
        contract.attach(model, self, claimed=[f"{name}.weight" for name in self.layers])
        try:
            strategy_cls.check(model, self.layers)
        except ValueError:
            contract.detach(model, self)
            raise
        self.mask_version = 0
        self.schedule = NMSchedule(config)
        self._finalized = False
        self.last_flip_fraction: torch.Tensor | None = None
        self._flip_count: torch.Tensor | None = None
        self._flip_total = 0
        self._index = {name: i for i, name in enumerate(self.layers)}
        lam = self._lambda()
        self.params: dict[str, NMMask] = {name: NMMask(None, beta=config.beta(0), lambda_w=lam)
                                          for name in self.layers}
        self.strategy: MaskingStrategy = strategy_cls(self)
        self.strategy.attach()
        self._hooks = []
        with torch.no_grad():
            self.recompute_masks(count_flips=False)
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.step()))
        if verify_now:
            self.check_ranks()
            self.strategy.mask()

    # ------------------------------------------------------------------ weights and masks
    def dense_weight(self, name: str) -> torch.Tensor:
        """The live dense weight (the trained parameter) of layer ``name``."""
        return self.strategy.dense_weight(self._index[name])

    def before_optimizer_step(self) -> None:
        """``inplace``: put the dense weights back and add SR-STE's term to their gradients; call it
        after the backward pass(es) and before every ``optimizer.step()`` (``optimizer=`` does).
        A no-op with the other strategies.

        Raises:
            RuntimeError: (``inplace``) the weights were never masked (attached with
                ``verify_now=False`` and :meth:`refresh` not called).
        """
        self._check_live()
        self.strategy.before_optimizer_step()

    @property
    def masks(self) -> _Masks:
        """``masks()``: parameter name (``"<layer>.weight"``, the weight's name in the plain model) ->
        the bool mask the forward pass uses (``True`` = kept). The tensors are the live masks: do
        not modify them, and clone them to keep them past the next update.

        A layer without a current pattern (during SDGF's first, dense stage) is left out, so the
        dict may be ``{}``; after :meth:`finalize` it is ``{}``. With ``masks_in_forward`` the
        stored masks are brought up to date first.

        Reading ``masks`` as a mapping (``sp.masks[layer]``, keyed by module name, None in a dense
        stage) is the previous API: it still works and warns.
        """
        return _Masks(self)

    def _param_masks(self) -> dict[str, torch.Tensor]:
        self._refresh_stored()
        return {f"{name}.weight": p.mask for name, p in self.params.items() if p.mask is not None}

    def _layer_masks(self) -> dict[str, torch.Tensor | None]:
        self._refresh_stored()
        return {name: p.mask for name, p in self.params.items()}

    @torch.no_grad()
    def _refresh_stored(self) -> None:
        """Bring the stored masks up to date with the weights (``masks_in_forward``)."""
        if not self._finalized:
            self.strategy.refresh_stored()

    @property
    def step_count(self) -> int:
        """Optimizer steps taken."""
        return self.schedule.step

    @property
    def pattern(self) -> tuple[int, int] | None:
        """The N:M pattern in force now (None: dense stage)."""
        return self.schedule.pattern

    @property
    def finalized(self) -> bool:
        """Whether :meth:`finalize` ran (weights exactly N:M, parametrizations removed)."""
        return self._finalized

    def _lambda(self) -> float:
        lam = self.config.lambda_w / self.config.grad_accumulation
        if lam and self.grad_scaler is not None and self.grad_scaler.is_enabled():
            lam *= float(self.grad_scaler.get_scale())
        return lam

    @torch.no_grad()
    def refresh(self, recompute: bool = True) -> None:
        """Recompute every mask from the current weights and check they are equal on all ranks;
        with ``inplace``, then mask the weights in place.

        Args:
            recompute: False keeps the current masks (e.g. just restored from a checkpoint) and
                only checks them and, with ``inplace``, masks the weights.

        Raises:
            ValueError: ``recompute`` is not a bool; with ``recompute``, a layer's weight holds NaN or
                inf (naming the layers).
        """
        if not isinstance(recompute, bool):
            raise ValueError(f"`recompute` must be True or False, got {recompute!r}")
        self._check_live()
        self.strategy.unmask(decay=False)
        if recompute:
            weights = self.strategy.dense_weights()
            finite = torch.stack([torch.isfinite(w).all().cpu() for w in weights]).tolist() if weights else []
            bad = [name for name, ok in zip(self.params, finite) if not ok]
            if bad:
                self.strategy.mask()
                raise ValueError(
                    f"the weights of layer(s) {', '.join(bad)} hold NaN or inf: N:M masks computed from them would "
                    "keep the NaNs (NaN ranks as the largest magnitude). Fix or reload the weights first"
                )
            self.recompute_masks(count_flips=False)
        self.check_ranks()
        self.strategy.mask()

    def recompute_masks(self, count_flips: bool) -> None:
        """Recompute every layer's mask at the pattern in force from its dense weight (with
        ``count_flips``, counting the entries that flipped); the strategies call this."""
        self.strategy.stale = False
        self.mask_version += 1
        pat = self.schedule.pattern
        if pat is None:
            for p in self.params.values():
                p.set_mask(None)
            return
        weights = self.strategy.dense_weights()
        olds = []
        for w, p in zip(weights, self.params.values()):
            old = p.mask if count_flips and p.mask is not None and p.mask.shape == w.shape else None
            if old is not None and old.get_device() != w.get_device():
                old = old.to(w.device)
            olds.append(old)
        compiled = self._compiled(weights)
        if pat[1] <= 16:  # the layers' shapes were checked when attaching
            news, comps, flips = _nm_masks(weights, *pat, olds, compiled, complements=True, check=False)
        else:
            news = [nm_mask(w, *pat) for w in weights]
            comps = [~new for new in news]
            flips = sum((new != old).sum() for new, old in zip(news, olds) if old is not None) \
                if any(o is not None for o in olds) else None
        for p, new, comp in zip(self.params.values(), news, comps):
            p.set_mask(new, comp)
        if flips is not None:
            total = sum(old.numel() for old in olds if old is not None)
            self.last_flip_fraction = flips.double() / total
            self._flip_count = flips if self._flip_count is None else self._flip_count + flips.to(
                self._flip_count.device)
            self._flip_total += total

    def _compiled(self, weights: list[torch.Tensor]) -> bool:
        """Whether to compute masks under torch.compile: as configured, or (None) on CUDA weights."""
        if self.config.compile_masks is None:
            return bool(weights) and weights[0].is_cuda
        return self.config.compile_masks

    # ------------------------------------------------------------------ the schedule
    @torch.no_grad()
    def step(self) -> None:
        """Advance one optimizer step: schedule (beta, SDGF pattern), masks when due, statistics."""
        self._check_live()
        self.strategy.check_step()
        changed = self.schedule.advance()
        self.strategy.apply_schedule(self.schedule.beta, self._lambda())
        self.strategy.step(changed)

    def statistics(self) -> dict[str, float]:
        """Flat statistics, plain floats (one host copy of the device counters):

        - ``nm/step``: optimizer steps taken; ``nm/n``, ``nm/m``: the target pattern;
        - ``nm/density``: the fraction of each sparse weight the forward pass keeps under the pattern
          in force (``n/m``; 1.0 in SDGF's dense stage);
        - ``nm/beta`` (``mdgf`` only): the weight on pruned entries in the forward pass;
        - ``nm/mask_flip_fraction``: the fraction of mask entries that flipped at the last measured
          update, and ``nm/mean_mask_flip_fraction`` on average since attaching (SR-STE's aim is to
          make it fall); both present once an update was measured.

        These are the keys the Lightning callback logs and its ``summary()`` writes.
        """
        pat, cfg = self.schedule.pattern, self.config
        out: dict[str, float] = {
            "nm/step": float(self.step_count),
            "nm/n": float(cfg.n),
            "nm/m": float(cfg.m),
            "nm/density": pat[0] / pat[1] if pat else 1.0,
        }
        if cfg.method == "mdgf":
            out["nm/beta"] = float(cfg.beta(self.step_count))
        if self.last_flip_fraction is not None:
            last, count = torch.stack([self.last_flip_fraction.double(),
                                       self._flip_count.to(self.last_flip_fraction.device).double()]).tolist()
            out["nm/mask_flip_fraction"] = last
            out["nm/mean_mask_flip_fraction"] = count / self._flip_total
        return out

    def stats(self) -> dict[str, Any]:
        """Deprecated: use :meth:`statistics` (flat ``nm/...`` keys, plain floats).

        Statistics: step, the pattern in force (``"2:4"``, ``"dense"``), beta, density of the
        forward weights, and the fraction of mask entries that flipped at the last update and on
        average since attaching.
        """
        _warn.warn("NMSparsifier.stats() is deprecated; use statistics() (keys 'nm/step', 'nm/density', "
                      "'nm/mask_flip_fraction', ...)", FutureWarning, stacklevel=2)
        pat = self.schedule.pattern
        out: dict[str, Any] = {
            "step": self.step_count,
            "pattern": f"{pat[0]}:{pat[1]}" if pat else "dense",
            "beta": self.config.beta(self.step_count),
            "density": pat[0] / pat[1] if pat else 1.0,
        }
        if self.last_flip_fraction is not None:
            out["mask_flip_fraction"] = float(self.last_flip_fraction)
            out["mean_mask_flip_fraction"] = float(self._flip_count) / self._flip_total
        return out

    @torch.no_grad()
    def check_ranks(self) -> None:
        """Raise unless every rank holds identical masks and schedule (no-op outside ``torch.distributed``).

        Compares a per-layer fingerprint of the masks (:func:`sparsetrain.contract.fingerprint`) and
        the schedule's step and pattern with :func:`sparsetrain.contract.check_in_sync`.

        Raises:
            RankDivergenceError: on every rank, naming the layers whose masks differ.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.process_group) < 2:
            return
        self._refresh_stored()
        pat = self.schedule.pattern or (0, 0)
        fps = {"nm/schedule": torch.tensor([self.step_count, pat[0], pat[1]], dtype=torch.int64)}
        for name, p in self.params.items():  # every layer, in order: the same rows on every rank
            fps[f"{name}.weight"] = (contract.fingerprint(p.mask) if p.mask is not None
                                     else torch.tensor([-1, -1], dtype=torch.int64))
        device = next((f.device for f in fps.values() if f.device.type != "cpu"), None)
        if device is not None:
            fps = {k: v.to(device) for k, v in fps.items()}
        try:
            contract.check_in_sync(fps, self.process_group, what=f"N:M masks at step {self.step_count}")
        except contract.RankDivergenceError as err:
            raise contract.RankDivergenceError(
                f"{err}: the weights are not identical on every rank (was the sparsifier attached before DDP "
                f"broadcast the weights? call refresh() after wrapping)") from None

    # ------------------------------------------------------------------ export / finalize
    def exported_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every sparse layer's weight exactly N:M (plain keys, copies),
        whatever the masking strategy; it loads into the plain model.

        Built from :meth:`masks` when they are at the target pattern; otherwise (an SDGF stage
        before the target) from the target's magnitude masks of the current dense weights. The same
        as ``nm_export_state_dict(model.state_dict(), n, m, masks=sparsifier.masks())`` at the target.
        """
        self._check_live()
        if self.schedule.at_target:
            masks = self.masks()
        else:
            n, m = self.config.n, self.config.m
            masks = {f"{name}.weight": nm_mask(w, n, m) for name, w in zip(self.layers, self.strategy.dense_weights())}
        return nm_export_state_dict(self.model.state_dict(), self.config.n, self.config.m, masks=masks)

    def _target_masks(self) -> dict[str, torch.Tensor]:
        if not self.schedule.at_target:
            return {}
        self._refresh_stored()
        return {name: p.mask for name, p in self.params.items() if p.mask is not None}

    @torch.no_grad()
    def finalize(self) -> dict[str, nn.Module]:
        """End training: make each sparse weight exactly N:M in place, remove the strategy's
        parametrizations and hooks, and detach from the model.

        The layers get their plain ``weight`` parameter back (the same object the optimizer holds)
        holding ``where(mask, W, 0)`` at the target pattern. Idempotent.

        Returns:
            The finalized layers by name.
        """
        if self._finalized:
            return dict(self.layers)
        self.check_ranks()
        self.strategy.unmask(decay=False)
        target = self._target_masks()
        n, m = self.config.n, self.config.m
        masks = []
        for name, w in zip(self.layers, self.strategy.dense_weights()):
            mask = target.get(name)
            masks.append(nm_mask(w, n, m) if mask is None else mask.to(w.device))
        self.strategy.release()
        for mod, p, mask in zip(self.layers.values(), self.params.values(), masks):
            contract.mask_(mod.weight, mask)
            p.set_mask(None)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._finalized = True
        self.mask_version += 1
        contract.detach(self.model, self)
        return dict(self.layers)

    def remove(self) -> None:
        """Leave a plain model: what :meth:`finalize` does (each sparse weight exactly N:M in its plain
        ``weight`` parameter, no parametrization, no hook), and detach from the model. Idempotent."""
        self.finalize()

    def _check_live(self) -> None:
        if self._finalized:
            raise RuntimeError("this NMSparsifier was finalized; attach a new one to keep training sparse")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Plain-dict state (version 2): the config, schedule step, pattern, packed masks by layer,
        statistics; plain tensors and Python values (loads with ``weights_only=True``)."""
        cfg = self.config
        self._refresh_stored()
        masks = {}
        shapes = {}
        for name, p in self.params.items():
            if p.mask is not None:
                masks[name] = pack_mask(p.mask).cpu()
                shapes[name] = list(p.mask.shape)
        return {
            "version": _STATE_VERSION,
            "config": cfg.to_dict(),
            "n": cfg.n, "m": cfg.m, "method": cfg.method,
            **self.schedule.state_dict(),
            "layers": list(self.layers),
            "masks": masks,
            "mask_shapes": shapes,
            "flip_count": int(self._flip_count) if self._flip_count is not None else None,
            "flip_total": self._flip_total,
            "last_flip_fraction": float(self.last_flip_fraction) if self.last_flip_fraction is not None else None,
            "finalized": self._finalized,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the model's own weights were restored).

        The state of a finalized sparsifier resumes too (training more steps after a finished
        run): the masks are then recomputed from the restored, already N:M, weights.

        Reads version 2 and the previous release's version 1 (which saved no config: only its
        pattern and method are checked).

        Raises:
            ValueError: an unknown version, a config that differs from this one in a field that
                changes the math (naming it: n, m, method, lambda_w, update_every, decay,
                decay_steps, stages, include, exclude), another set of layers, a missing entry
                (naming it), or a packed mask that is truncated or of another shape. Nothing is
                changed then.
        """
        self._check_live()
        if not isinstance(state, Mapping):
            raise ValueError(f"`state` must be a dict from NMSparsifier.state_dict(), got {type(state).__name__}")
        version = state.get("version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"`state` has version {version!r}; this sparsetrain reads versions 1 and {_STATE_VERSION}")
        needed = ["layers", "masks", "mask_shapes", "step", "updates", "pattern"]
        needed += ["config"] if version >= 2 else ["n", "m", "method"]
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"`state` is truncated: it has no {', '.join(repr(k) for k in missing)} "
                             "(not a complete NMSparsifier.state_dict())")
        for key in ("step", "updates"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"`state[{key!r}]` must be an int >= 0, got {state[key]!r}")
        saved = dict(state["config"]) if version >= 2 else {k: state[k] for k in ("n", "m", "method")}
        if saved.get("stages") is not None:
            saved["stages"] = [tuple(st) for st in saved["stages"]]
        contract.check_config(saved, self.config, _MATH_FIELDS, "NMSparsifier")
        if list(state["layers"]) != list(self.layers):
            missing = sorted(set(state["layers"]) ^ set(self.layers))
            raise ValueError(f"`state` covers other layers than this sparsifier (differing: {', '.join(missing)})")
        loaded: dict[str, torch.Tensor] = {}
        if not state.get("finalized"):
            if not isinstance(state["masks"], Mapping) or not isinstance(state["mask_shapes"], Mapping):
                raise ValueError("`state['masks']` and `state['mask_shapes']` must be dicts keyed by layer name")
            for name, w in zip(self.layers, self.strategy.dense_weights()):
                if name not in state["masks"]:
                    continue
                shape = state["mask_shapes"].get(name)
                if shape is None or tuple(shape) != tuple(w.shape):
                    raise ValueError(f"`state['mask_shapes'][{name!r}]` is {shape!r}, the layer's weight has shape "
                                     f"{tuple(w.shape)}")
                try:
                    loaded[name] = unpack_mask(state["masks"][name], shape)
                except ValueError as err:
                    raise ValueError(f"`state['masks'][{name!r}]`: {err}") from None
        self.strategy.unmask(decay=False)
        self.schedule.load_state_dict(state)
        pattern = self.schedule.pattern
        self.strategy.apply_schedule(self.schedule.beta, self._lambda())
        for name, w, p in zip(self.layers, self.strategy.dense_weights(), self.params.values()):
            if state.get("finalized"):
                # Training continues after a finished run: its weights are already exactly N:M.
                p.set_mask(nm_mask(w, *pattern) if pattern else None)
            elif name in loaded:
                p.set_mask(loaded[name].to(w.device))
            else:
                p.set_mask(None)
        self.strategy.after_load()
        fc = state.get("flip_count")
        self._flip_count = torch.tensor(fc) if fc is not None else None
        self._flip_total = int(state.get("flip_total") or 0)
        lf = state.get("last_flip_fraction")
        self.last_flip_fraction = torch.tensor(lf, dtype=torch.float64) if lf is not None else None
        self.mask_version += 1
        self.check_ranks()
        self.strategy.resume()


class _Masks(Mapping):
    """What :attr:`NMSparsifier.masks` returns: call it for the contract's ``masks()`` (parameter
    name -> mask); read it as a mapping for the previous API (layer name -> mask or None), which
    warns."""

    __slots__ = ("_owner",)

    def __init__(self, owner: NMSparsifier) -> None:
        self._owner = owner

    def __call__(self) -> dict[str, torch.Tensor]:
        return self._owner._param_masks()

    def _legacy(self) -> dict[str, torch.Tensor | None]:
        _warn.warn("reading NMSparsifier.masks as a mapping by layer name is deprecated; call masks(), keyed "
                      "by parameter name ('<layer>.weight')", FutureWarning, stacklevel=3)
        return self._owner._layer_masks()

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self._legacy()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._legacy())

    def __len__(self) -> int:
        return len(self._owner.params)
