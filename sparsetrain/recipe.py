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

Your own model and data are named the way LightningCLI names them, by ``class_path`` and
``init_args``::

    model:
      class_path: mypkg.models.MyNet      # an nn.Module (wrapped) or a LightningModule
      init_args: {hidden: 256}
      loss: cross_entropy                  # for an nn.Module: cross_entropy, mse or l1
    data:
      class_path: mypkg.data.MyDataModule  # a LightningDataModule
      init_args: {batch_size: 32}

An ``nn.Module`` is trained by :class:`sparsetrain.train.ModelTask` with the recipe's
``optimizer`` and the named loss on batches ``(inputs, targets)``; a ``LightningModule``
is used as it is (its own ``configure_optimizers``; the recipe may then not set
``optimizer`` or ``model.loss``). The demo names (``gpt``, ``mlp``, ``stdlib_chars``,
``synthetic_classification``) stay as short aliases.

Files are read with ``yaml.safe_load`` (no YAML tags, no Python objects) and no value is
ever evaluated: importing the module named by a ``class_path`` is the only code a recipe
can cause to run. Every value is checked before any training starts; an unknown key, a
duplicate key, a value of the wrong type or out of range fails with a :class:`RecipeError`
whose message starts with the key path (``trainer.max_steps``, ``callbacks[1].sparsity``,
``model.init_args.hidden``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .components import RecipeError, build_component, check_value

__all__ = [
    "RECIPE_VERSION",
    "LOSSES",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "recipe_from_record",
    "TrainerConfig",
    "apply_overrides",
    "build_callbacks",
    "import_class",
    "load_recipe",
    "parse_recipe",
]

RECIPE_VERSION = 1


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}")


LOSSES = ("cross_entropy", "mse", "l1")


def import_class(path: str, key: str) -> type:
    """Import ``package.module.Class`` (or ``package.module:Class``); the only code a recipe runs.

    Raises:
        RecipeError: ``path`` is malformed, its module cannot be imported or has no such class.
    """
    module, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    pattern = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    if not sep or not re.fullmatch(pattern, module) or not attr.isidentifier():
        raise RecipeError(f"{key}: must look like 'package.module.Class', got {path!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise RecipeError(f"{key}: cannot import module {module!r}: {err}") from err
    cls = getattr(mod, attr, None)
    if not inspect.isclass(cls):
        raise RecipeError(f"{key}: module {module!r} has no class {attr!r}")
    return cls


def _check_init_args(cls: type, init_args: dict[str, Any], key: str) -> None:
    """Unknown or missing constructor arguments, found without constructing anything."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in init_args:
        if name not in named and not takes_kwargs:
            raise RecipeError(f"{key}.init_args.{name}: unknown argument of {cls.__qualname__}; "
                              f"allowed: {', '.join(named) or '(none)'}")
    for name in named:
        if params[name].default is inspect.Parameter.empty and name not in init_args:
            raise RecipeError(f"{key}.init_args.{name}: required by {cls.__qualname__}")


@dataclass(kw_only=True)
class ModelConfig:
    """The model: ``gpt`` (the demo language model), ``mlp`` (the small classifier), or your own.

    GPT fields: ``block_size``, ``n_layer``, ``n_head``, ``d_model`` (multiple of 64),
    ``mlp_ratio``, ``dropout``. MLP fields: ``in_features``, ``hidden``, ``n_classes``.

    Your own: ``class_path`` (an ``nn.Module`` or ``LightningModule`` class), ``init_args``
    (its keyword arguments) and, for an ``nn.Module``, ``loss`` (``cross_entropy``, ``mse``
    or ``l1``). The demo fields do not apply to it. With the demo data, ``synthetic_classification``
    yields 64 features and 8 classes, ``stdlib_chars`` 128-byte blocks (vocabulary 256).
    """

    name: Literal["gpt", "mlp"] = "gpt"
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    loss: Literal["cross_entropy", "mse", "l1"] = "cross_entropy"
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
        if self.class_path is not None:
            return
        if self.name == "gpt":
            from .demo.model import GPTConfig

            GPTConfig(**self.gpt_kwargs())  # raises ValueError naming the field

    def gpt_kwargs(self) -> dict[str, Any]:
        return dict(block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model,
                    mlp_ratio=self.mlp_ratio, dropout=self.dropout)


@dataclass(kw_only=True)
class DataConfig:
    """The data: ``stdlib_chars`` (byte corpus of the standard library, for ``gpt``),
    ``synthetic_classification`` (Gaussian blobs, for ``mlp``), or your own
    ``LightningDataModule`` named by ``class_path`` with ``init_args`` (the demo fields then
    do not apply; Lightning shards its loaders with a ``DistributedSampler``, so a resume
    mid-epoch is exact only with the demo data's resumable loader)."""

    name: Literal["stdlib_chars", "synthetic_classification"] = "stdlib_chars"
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
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
        progress_every_n_steps: print one progress line (step, loss, throughput, achieved
            sparsity and compression) on rank 0 this often; 0: never.
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
    progress_every_n_steps: int = 50
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    checkpoint_every_n_steps: int = 0
    seed: int = 0
    deepspeed_stage: Literal[1, 2, 3] = 2
    deterministic: bool = True

    def __post_init__(self) -> None:
        _positive(self, "devices", "num_nodes", "max_steps", "val_check_interval", "limit_val_batches",
                  "log_every_n_steps", "accumulate_grad_batches")
        if self.progress_every_n_steps < 0:
            raise ValueError(f"`progress_every_n_steps` must be >= 0, got {self.progress_every_n_steps}")
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
        if not math.isfinite(self.lr):
            raise ValueError(f"`lr` must be finite, got {self.lr}")
        if not self.weight_decay >= 0:  # NaN fails here too
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if not math.isfinite(self.weight_decay):
            raise ValueError(f"`weight_decay` must be finite, got {self.weight_decay}")
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
        if self.model.class_path is not None or self.data.class_path is not None:
            return
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


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")

_USER_KEYS = {"model": ("class_path", "init_args", "loss"), "data": ("class_path", "init_args")}


def _check_user_classes(raw: dict[str, Any], sections: dict[str, Any]) -> None:
    """``class_path`` entries: importable, of the right kind, constructor arguments that fit."""
    import lightning.pytorch as pl
    import torch

    for key, base in (("model", torch.nn.Module), ("data", pl.LightningDataModule)):
        config = sections[key]
        given = raw.get(key) or {}
        if config.class_path is None:
            for field_name in _USER_KEYS[key]:
                if field_name in given:
                    raise RecipeError(f"{key}.{field_name}: only applies with `{key}.class_path`")
            continue
        demo = [k for k in given if k not in _USER_KEYS[key]]
        if demo:
            raise RecipeError(f"{key}.{demo[0]}: a demo field, not used with `{key}.class_path`; "
                              f"give your class's arguments under `{key}.init_args`")
        cls = import_class(config.class_path, f"{key}.class_path")
        if not issubclass(cls, base):
            raise RecipeError(f"{key}.class_path: {config.class_path!r} is a {type(cls).__name__} that is not "
                              f"a subclass of {base.__module__}.{base.__qualname__}")
        _check_init_args(cls, config.init_args, key)
        if key == "model" and issubclass(cls, pl.LightningModule):
            for section in ("optimizer", "model.loss"):
                top, _, sub = section.partition(".")
                if (sub in given) if sub else (raw.get(top) is not None):
                    raise RecipeError(f"{section}: {config.class_path!r} is a LightningModule, which brings its "
                                      "own loss and configure_optimizers(); remove this key")


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
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise RecipeError(f"name: must be a plain run name (letters, digits, '.', '_', '-'; no '/'), got {name!r}; "
                          "the run is written to runs/<name>")
    sections = {key: _build_dataclass(cls, data.get(key), key) for key, cls in _SECTIONS.items()}
    _check_user_classes(data, sections)
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


def recipe_from_record(record: Any) -> Recipe:
    """The recipe a run recorded (``summary.json``'s ``config``, an export's ``recipe``: the parsed
    recipe with every field), parsed again.

    Raises:
        RecipeError: ``record`` is not such a mapping, or does not parse.
    """
    if not isinstance(record, dict):
        raise RecipeError(f"recorded recipe: expected a mapping, got {type(record).__name__}")
    data: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
            if key in _USER_KEYS:  # class_path mode keeps only its own keys; demo mode drops them
                user = value.get("class_path") is not None
                value = {k: v for k, v in value.items() if (k in _USER_KEYS[key]) == user}
        data[key] = value
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("class_path"), str):
        import lightning.pytorch as pl

        if issubclass(import_class(model["class_path"], "model.class_path"), pl.LightningModule):
            # a LightningModule brings its own optimizer and loss: the recorded defaults are no choice
            data.pop("optimizer", None)
            model.pop("loss", None)
    return parse_recipe(data, check_components=False)


def build_callbacks(recipe: Recipe) -> list[Any]:
    """Construct the recipe's components, in order (raises :class:`RecipeError`)."""
    return [build_component(spec, f"callbacks[{i}]") for i, spec in enumerate(recipe.callbacks)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # SafeLoader raises its own, clearer error below
        if key in seen:
            raise RecipeError(f"{key}: duplicate key (line {seen[key] + 1} and line {key_node.start_mark.line + 1}); "
                              "YAML would silently keep the last one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


_PART = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


def _split_key(key: str, item: str) -> list[str | int]:
    """``callbacks[0].include`` -> ``["callbacks", 0, "include"]``."""
    parts: list[str | int] = []
    pos = 0
    while pos < len(key):
        if parts and key[pos] == "." and pos + 1 < len(key) and key[pos + 1] != "[":
            pos += 1
        m = _PART.match(key, pos)
        if m is None:
            raise RecipeError(f"--set {item!r}: cannot read the key path {key!r} at position {pos}")
        if m.group(1) is not None:
            parts.append(m.group(1))
        else:
            try:
                idx = int(m.group(2))
            except ValueError:
                raise RecipeError(f"--set {item!r}: list index [{m.group(2)}] must be an integer") from None
            if idx < 0:
                raise RecipeError(f"--set {item!r}: list index [{idx}] must be >= 0")
            parts.append(idx)
        pos = m.end()
    if not parts:
        raise RecipeError(f"--set {item!r}: empty key path")
    return parts


def _path_str(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars) to a raw recipe mapping.

    ``callbacks[0].density=0.01`` addresses a list entry. A value YAML cannot read (``*.mlp.*``
    starts with a YAML alias) is kept as the string it is, except that a value which looks
    like a YAML list or mapping and does not parse is refused.

    Raises:
        RecipeError: one line starting with the key path: an override without ``=``, a bad or
            missing list index, a path through a value that is not a mapping or list.
    """
    data = dict(data)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY.PATH=VALUE")
        key, _, raw = item.partition("=")
        parts = _split_key(key.strip(), item)
        where = _path_str(parts)
        try:
            value = _safe_load(raw) if raw else None
        except (yaml.YAMLError, RecipeError) as err:
            if raw.lstrip()[:1] in ("[", "{"):
                reason = _yaml_reason(err) if isinstance(err, yaml.YAMLError) else str(err)
                raise RecipeError(f"{where}: --set value {raw!r} is not valid YAML ({reason})") from None
            value = raw  # e.g. `*.mlp.*`: a glob, not a YAML alias
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = _path_str(parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise RecipeError(f"{here}: --set indexes [{part}] into a {type(node).__name__}, not a list")
                if part >= len(node):
                    raise RecipeError(f"{here}: --set: no list entry {part} (the list has {len(node)})")
            elif not isinstance(node, dict):
                raise RecipeError(f"{here}: --set goes into {_path_str(parts[:i]) or 'the recipe'}, "
                                  f"which is a {type(node).__name__} ({node!r}), not a mapping")
            if last:
                node[part] = value
                break
            child = node[part] if isinstance(part, int) else node.get(part)
            if child is None:
                child = [] if isinstance(parts[i + 1], int) else {}
            elif isinstance(child, (dict, list)):
                child = type(child)(child)
            node[part] = child
            node = child
    return data


def _yaml_reason(err: yaml.YAMLError) -> str:
    """One line: what YAML found wrong and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise RecipeError(f"{path}: a binary file, not a YAML recipe")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start}), not a YAML recipe") from None


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), *, check_components: bool = True) -> Recipe:
    """Read a YAML recipe with a ``yaml.SafeLoader`` that refuses duplicate keys, apply overrides, validate it.

    Raises:
        ValueError: ``path`` does not exist.
        RecipeError: a binary file, invalid YAML, a duplicate key, a bad override or an invalid recipe.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`recipe` must be an existing YAML file, got {str(path)!r}")
    text = _read_text(path)
    try:
        data = _safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {_yaml_reason(err)}") from err
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a mapping at the top level, got {type(data).__name__}")
        data = apply_overrides(data, overrides)
    return parse_recipe(data, check_components=check_components)
