"""What every sparsetrain callback shares: one core component, its state in the checkpoint, its statistics.

A callback is a thin adapter over a core component (docs/architecture.md). This base gives each of them:

- the component's config built from the callback's keyword arguments: the fields of ``config_class``
  are the callback's arguments without being listed again (the class's signature is made from them,
  so recipes and ``LightningCLI`` see every argument with its type and default);
- the checkpoint state: ``state_dict()`` is the component's; a state that arrives before the component
  exists (Lightning restores callback states before ``setup``) is kept and loaded once it does;
- a distinct ``state_key`` per instance (from ``_state_key_fields``), so two callbacks of one class on
  different layers can share a Trainer;
- logging the component's ``statistics()`` under their own keys, and ``summary()`` for ``summary.json``;
- ``fresh_state_ok`` (every callback's argument, default False): resuming from a checkpoint that has
  no state for the callback is an error unless it is True (then a fresh component state, with a warning).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, ClassVar

from lightning.pytorch.callbacks import Callback

from sparsetrain import _warn

__all__ = ["ComponentCallback", "DDPHookCallback", "check_bool"]


class ComponentCallback(Callback):
    """Base of the callbacks; subclasses set ``config_class`` and build ``self.component`` in ``setup``."""

    #: The component's config dataclass, whose fields are keyword arguments of the callback.
    config_class: ClassVar[type | None] = None
    #: Arguments that make two instances of the callback distinct (their checkpoint ``state_key``).
    _state_key_fields: ClassVar[tuple[str, ...]] = ()
    #: Config fields the callback does not take as arguments (set by the callback itself).
    _hidden_fields: ClassVar[tuple[str, ...]] = ()
    #: Whether the component reads the gradients between the backward pass and the optimizer step
    #: (so a component that masks gradients must mask them as they are computed).
    reads_gradients_before_step: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_class is not None and "__init__" in cls.__dict__:
            cls.__signature__ = _signature(cls)  # type: ignore[attr-defined]

    def __init__(self, *, fresh_state_ok: bool = False, **config_fields: Any) -> None:
        super().__init__()
        self.fresh_state_ok = check_bool("fresh_state_ok", fresh_state_ok)
        self.component: Any = None
        self._pending: dict[str, Any] | None = None
        defaults = {name: f.default for name, f in self.config_fields().items()
                    if f.default is not dataclasses.MISSING} if self.config_class is not None else {}
        self._key_values = {k: _plain(config_fields.get(k, defaults.get(k))) for k in self._state_key_fields}

    # ------------------------------------------------------------------ config

    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        """The config fields the callback takes as keyword arguments."""
        assert cls.config_class is not None
        return {f.name: f for f in dataclasses.fields(cls.config_class)
                if f.init and f.name not in cls._hidden_fields}

    @classmethod
    def split_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The config fields among ``kwargs``.

        Raises:
            TypeError: an argument that is neither the callback's nor a config field (naming it and the allowed ones).
        """
        # Hidden fields are left out of the signature only: LightningCLI (jsonargparse follows
        # ``**config_fields`` into the config class) may still pass them, with their defaults.
        assert cls.config_class is not None
        fields = {f.name for f in dataclasses.fields(cls.config_class) if f.init}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            allowed = ", ".join(sorted(inspect.signature(cls).parameters))
            raise TypeError(f"{cls.__name__} got an unexpected argument `{unknown[0]}`; allowed: {allowed}")
        return dict(kwargs)

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key_values) if self._key_values else super().state_key

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        """The key of checkpoints from before ``state_key`` was per instance: the class name.

        Lightning falls back to it when a checkpoint has no state under :attr:`state_key`.
        """
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        if self.component is None:
            return dict(self._pending or {})
        return self.component.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.component is None:
            self._pending = dict(state_dict)
            return
        self._pending = None
        self._load_component_state(state_dict)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint without this callback's state unless ``fresh_state_ok``.

        A checkpoint written without the callback (or by another configuration of it, whose
        ``state_key`` differs) would otherwise resume the weights with a fresh component state: a
        DGC warm-up from step 0, masks drawn again, a new schedule.

        Raises:
            ValueError: the checkpoint has no state under :attr:`state_key`, naming the keys it has.
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._legacy_state_key in states:
            return
        what = (f"the checkpoint has no state for {type(self).__name__} (state key {self.state_key!r}; "
                f"it holds {sorted(states) or 'no callback state'})")
        if self.fresh_state_ok:
            _warn.warn(f"{what}: starting a fresh {type(self).__name__} state (fresh_state_ok=True)")
            return
        raise ValueError(
            f"{what}. Resuming would restart the component from scratch on trained weights. Resume from a "
            f"checkpoint written with the same callback arguments, or pass {type(self).__name__}(..., "
            "fresh_state_ok=True) to start a fresh component state on purpose"
        )

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint of a fit that ran in other processes (``strategy="ddp_spawn"``).

        Those processes held the component (masks, schedule, residuals) and have ended; the main
        process got the weights back but not that state, so the checkpoint would resume without it.

        Raises:
            RuntimeError: the Trainer finished fitting, but never in this process.
        """
        state = getattr(trainer, "state", None)
        if self.component is not None or self._pending or state is None:
            return
        if getattr(state, "fn", None) == "fit" and getattr(state, "status", None) == "finished":
            raise RuntimeError(
                f"{type(self).__name__}: this Trainer's fit ran in processes that have ended (strategy "
                f"{type(trainer.strategy).__name__}, e.g. 'ddp_spawn'), which held the {type(self).__name__} state; "
                "a checkpoint written now would hold neither it nor the masks. Save checkpoints during fit "
                "(ModelCheckpoint, or trainer.save_checkpoint in a callback), or use strategy='ddp'"
            )

    def _load_component_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state into the built component (subclasses add what follows a load)."""
        self.component.load_state_dict(state)

    def take_pending(self) -> dict[str, Any] | None:
        """The state that arrived before the component existed (once), or None."""
        state, self._pending = self._pending, None
        return state

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> dict[str, float]:
        """The component's ``statistics()`` ({} before it exists)."""
        return {} if self.component is None else self.component.statistics()

    @staticmethod
    def logging_due(trainer: Any) -> bool:
        """Whether to log at this optimizer step: every ``log_every_n_steps`` of the Trainer, and at the
        last step of a run of known length. Logging reads the statistics from the device, so it is
        not done at every step."""
        every = getattr(trainer, "log_every_n_steps", 1) or 1
        step = trainer.global_step
        return step % every == 0 or 0 < getattr(trainer, "max_steps", -1) <= step

    def log_statistics(self, pl_module: Any, keep: Any = None) -> None:
        """Log ``statistics()`` (those whose key ``keep(key)`` accepts) on this step."""
        values = {k: v for k, v in self.statistics().items() if keep is None or keep(k)}
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures for the run's ``summary.json``: the component's statistics."""
        return dict(self.statistics())


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool; a string such as ``'no'`` would otherwise read as True.

    Raises:
        TypeError: naming the argument and the value.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return value


class DDPHookCallback(ComponentCallback):
    """Base of the callbacks whose component is a DDP communication hook (compression, masked exchange).

    Lightning ignores ``DDPStrategy(ddp_comm_hook=...)`` on the CPU, so these callbacks register their hook
    themselves at the start of fitting, once per DDP model.
    """

    #: What the hook does to DDP's all-reduce, for the messages.
    _hook_purpose: ClassVar[str] = "replaces DistributedDataParallel's gradient all-reduce"
    reads_gradients_before_step = True  # the communication hook

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registered_on: int | None = None

    def check_strategy(self, trainer: Any) -> None:
        """At ``setup``: the DDP strategy, and no other communication hook where Lightning would register it.

        Raises:
            ValueError: another strategy, or a strategy carrying a communication hook on CUDA.
        """
        from lightning.pytorch.strategies import DDPStrategy
        name = type(self).__name__
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy) or "DeepSpeed" in type(strategy).__name__:
            raise ValueError(f"{name} needs the DDP strategy (strategy='ddp'), got {type(strategy).__name__}; "
                             f"it {self._hook_purpose}")
        user_hook = getattr(strategy, "_ddp_comm_hook", None)
        if user_hook is not None:
            hook = getattr(user_hook, "__name__", user_hook)
            if strategy.root_device.type == "cuda":
                raise ValueError(f"the DDP strategy already registers ddp_comm_hook={hook}; DDP takes one "
                                 f"communication hook: remove it or remove {name}")
            _warn.warn(  # the same on every rank: once
                f"Lightning ignores DDPStrategy(ddp_comm_hook={hook}) on {strategy.root_device.type}; {name} "
                "registers its own hook instead", stacklevel=2)

    def ddp_model(self, trainer: Any) -> Any:
        """The Trainer's DDP model.

        Raises:
            ValueError: the strategy's model is not ``DistributedDataParallel``.
        """
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(f"{type(self).__name__} needs trainer.strategy.model to be DistributedDataParallel, "
                             f"got {type(model).__name__}")
        return model

    def register_hook(self, model: Any, hook: Any) -> None:
        """Register ``hook`` with the component as its state on ``model``, once per model.

        Raises:
            ValueError: DDP refused it (another hook is registered).
        """
        if self._registered_on == id(model):
            return
        try:
            model.register_comm_hook(self.component, hook)
        except RuntimeError as err:
            raise ValueError(f"{type(self).__name__} could not register its hook (another one is registered?): "
                             f"{err}") from err
        self._registered_on = id(model)


def _plain(value: Any) -> Any:
    """A value as it enters a state key: lists and tuples alike as lists."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _signature(cls: type) -> inspect.Signature:
    """The callback's own parameters, then every config field it takes as a keyword argument."""
    own_hints = typing.get_type_hints(cls.__init__)
    own = [p.replace(annotation=own_hints.get(p.name, p.annotation))
           for p in inspect.signature(cls.__init__).parameters.values()
           if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    names = {p.name for p in own}
    hints = typing.get_type_hints(cls.config_class)
    extra = []
    for name, f in cls.config_fields().items():
        if name in names:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = inspect.Parameter.empty
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                       annotation=hints.get(name, inspect.Parameter.empty)))
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is p.POSITIONAL_OR_KEYWORD else p for p in own]
    return inspect.Signature(own + extra)
