"""Recipes: YAML descriptions of a training run, parsed into validated dataclasses.

A recipe names the model and data (default: the embedded demo), the trainer settings,
the optimizer and a list of sparsetrain components::

    version: 1
    model: {name: gpt, d_model: 128, n_layer: 2, n_head: 2, block_size: 128}
    data: {name: stdlib_chars, batch_size: 16}
    trainer: {devices: 2, strategy: ddp, max_steps: 200, val_check_interval: 100}
    optimizer: {name: adamw, lr: 0.003}
    callbacks:
      - name: dynamic_sparsity
        sparsity: 0.8

Files are read with ``yaml.safe_load``. Every value is checked before any training
starts; an unknown key, a value of the wrong type or out of range fails with a
:class:`RecipeError` whose message starts with the key path (``trainer.max_steps``,
``callbacks[1].sparsity``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .components import RecipeError, build_component, check_value

__all__ = [
    "RECIPE_VERSION",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "TrainerConfig",
    "apply_overrides",
    "build_callbacks",
    "load_recipe",
    "parse_recipe",
]

RECIPE_VERSION = 1


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")


@dataclass(kw_only=True)
class ModelConfig:
    """The model: ``gpt`` (the demo language model) or ``mlp`` (the small classifier).

    GPT fields: ``block_size``, ``n_layer``, ``n_head``, ``d_model`` (multiple of 64),
    ``mlp_ratio``, ``dropout``. MLP fields: ``in_features``, ``hidden``, ``n_classes``.
    """

    name: Literal["gpt", "mlp"] = "gpt"
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    in_features: int = 64
    hidden: int = 128
    n_classes: int = 8

    def __post_init__(self) -> None:
        _positive(self, "block_size", "n_layer", "n_head", "d_model", "mlp_ratio", "in_features", "hidden",
                  "n_classes")
        if self.name == "gpt":
            from .demo.model import GPTConfig

            GPTConfig(**self.gpt_kwargs())  # raises ValueError naming the field

    def gpt_kwargs(self) -> dict[str, Any]:
        return dict(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                    mlp_ratio=self.mlp_ratio, dropout=self.dropout)


@dataclass(kw_only=True)
class DataConfig:
    """The data: ``stdlib_chars`` (byte corpus of the standard library, for ``gpt``) or
    ``synthetic_classification`` (Gaussian blobs, for ``mlp``)."""

    name: Literal["stdlib_chars", "synthetic_classification"] = "stdlib_chars"
    batch_size: int = 16
    byte_budget: int = 2_000_000
    val_fraction: float = 0.1
    n: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "n")
        if self.byte_budget < 10_000:
            raise ValueError(f"`byte_budget` must be >= 10000, got {self.byte_budget}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"`val_fraction` must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class TrainerConfig:
    """Lightning ``Trainer`` settings.

    Args:
        devices: processes per node (CPU) or GPUs per node.
        num_nodes: nodes; under torchrun both are taken from its environment.
        accelerator: ``cpu`` (gloo), ``gpu`` (NCCL) or ``auto``.
        strategy: ``ddp`` (the default; the one comm hooks attach to), ``deepspeed`` (GPU only),
            or ``auto`` (single process).
        precision: Lightning precision string.
        max_steps: optimizer steps to train.
        val_check_interval: validate every this many steps (and at the end).
        limit_val_batches: validation batches per check.
        log_every_n_steps: how often training metrics are logged.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: global norm clipping, or null.
        checkpoint_every_n_steps: write ``checkpoints/last.ckpt`` this often (0: only at the end).
        seed: seeds model initialisation and the data order.
        deepspeed_stage: ZeRO stage for ``strategy: deepspeed``.
        deterministic: ask torch for deterministic kernels (exact resumes; on GPU some kernels
            then refuse to run, so GPU recipes may turn it off).
    """

    devices: int = 2
    num_nodes: int = 1
    accelerator: Literal["cpu", "gpu", "auto"] = "cpu"
    strategy: Literal["ddp", "deepspeed", "auto"] = "ddp"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    max_steps: int = 200
    val_check_interval: int = 100
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    checkpoint_every_n_steps: int = 0
    seed: int = 0
    deepspeed_stage: Literal[1, 2, 3] = 2
    deterministic: bool = True

    def __post_init__(self) -> None:
        _positive(self, "devices", "num_nodes", "max_steps", "val_check_interval", "limit_val_batches",
                  "log_every_n_steps", "accumulate_grad_batches")
        if self.checkpoint_every_n_steps < 0:
            raise ValueError(f"`checkpoint_every_n_steps` must be >= 0, got {self.checkpoint_every_n_steps}")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"`gradient_clip_val` must be > 0 or null, got {self.gradient_clip_val}")


@dataclass(kw_only=True)
class OptimizerConfig:
    """``adamw`` or ``sgd`` with a learning rate, weight decay, momentum (SGD) and linear warm-up steps."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum}")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")


@dataclass(kw_only=True)
class Recipe:
    """A whole run. ``callbacks`` keeps the raw entries; :func:`build_callbacks` constructs them."""

    version: int = RECIPE_VERSION
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    callbacks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"`version` must be {RECIPE_VERSION}, got {self.version}")
        pairs = {("gpt", "stdlib_chars"), ("mlp", "synthetic_classification")}
        if (self.model.name, self.data.name) not in pairs:
            raise ValueError(
                f"`data` {self.data.name!r} does not fit model {self.model.name!r}; "
                "use gpt with stdlib_chars or mlp with synthetic_classification"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "trainer": TrainerConfig, "optimizer": OptimizerConfig}


def _key_from_message(msg: str, keys: typing.Iterable[str]) -> str | None:
    return next((k for k in keys if f"`{k}`" in msg), None)


def _build_dataclass(cls: type, mapping: Any, path: str) -> Any:
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise RecipeError(f"{path}: expected a mapping, got {type(mapping).__name__} {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in mapping.items():
        if key not in names:
            raise RecipeError(f"{path}.{key}: unknown key; allowed: {', '.join(names)}")
        kwargs[key] = check_value(value, hints[key], f"{path}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        key = _key_from_message(str(err), names)
        raise RecipeError(f"{path}.{key}: {err}" if key else f"{path}: {err}") from err


def parse_recipe(data: Any, *, check_components: bool = True) -> Recipe:
    """Validate a recipe given as a mapping (what ``yaml.safe_load`` returns).

    Args:
        data: the recipe mapping.
        check_components: also construct every ``callbacks:`` entry once, so that a
            component's own argument checks run now rather than at training time.

    Raises:
        RecipeError: the first problem found, prefixed with its key path.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"recipe: expected a mapping at the top level, got {type(data).__name__}")
    allowed = ["version", "name", *_SECTIONS, "callbacks"]
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{key}: unknown key; allowed: {', '.join(allowed)}")
    if "version" not in data:
        raise RecipeError(f"version: missing; this sparsetrain reads version {RECIPE_VERSION}")
    version = check_value(data["version"], int, "version")
    if version != RECIPE_VERSION:
        raise RecipeError(f"version: must be {RECIPE_VERSION}, got {version}")
    name = check_value(data.get("name", "run"), str, "name")
    sections = {key: _build_dataclass(cls, data.get(key), key) for key, cls in _SECTIONS.items()}
    callbacks = data.get("callbacks") or []
    if not isinstance(callbacks, list):
        raise RecipeError(f"callbacks: expected a list, got {type(callbacks).__name__}")
    try:
        recipe = Recipe(version=version, name=name, callbacks=callbacks, **sections)
    except ValueError as err:
        raise RecipeError(f"data.name: {err}") from err
    if check_components:
        build_callbacks(recipe)
    return recipe


def build_callbacks(recipe: Recipe) -> list[Any]:
    """Construct the recipe's components, in order (raises :class:`RecipeError`)."""
    return [build_component(spec, f"callbacks[{i}]") for i, spec in enumerate(recipe.callbacks)]


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw recipe mapping.

    ``callbacks[0].density=0.01`` addresses a list entry.

    Raises:
        RecipeError: an override without ``=`` or addressing a missing list entry.
    """
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected KEY.PATH=VALUE")
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw) if raw else None
        node: Any = data
        parts = key.replace("[", ".[").split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part.startswith("["):
                idx = int(part.strip("[]"))
                if not isinstance(node, list) or idx >= len(node):
                    raise RecipeError(f"override {key}: no list entry {idx}")
                if last:
                    node[idx] = value
                else:
                    node[idx] = dict(node[idx]) if isinstance(node[idx], dict) else node[idx]
                    node = node[idx]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(f"override {key}: {part!r} is not inside a mapping")
                if last:
                    node[part] = value
                else:
                    child = node.get(part)
                    node[part] = list(child) if isinstance(child, list) else dict(child or {})
                    node = node[part]
    return data


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), *, check_components: bool = True) -> Recipe:
    """Read a YAML recipe with ``yaml.safe_load``, apply overrides, and validate it.

    Raises:
        ValueError: ``path`` does not exist.
        RecipeError: invalid YAML or an invalid recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`recipe` must be an existing YAML file, got {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return parse_recipe(data, check_components=check_components)
