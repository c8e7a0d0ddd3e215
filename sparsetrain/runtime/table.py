"""The dispatch table: per (layer shape, dtype, token-count bucket), is 2:4 or dense faster?

Measured once per GPU (a few seconds for a model's handful of shapes) and cached on disk as JSON,
keyed by the GPU's name and compute capability, torch's and CUDA's versions and cuSPARSELt's.
Each entry holds four timings (ms per call: dense and 2:4, eager and inside a CUDA graph) and the
cuSPARSELt algorithm picked by ``torch._cslt_sparse_mm_search`` for that bucket. A layer runs 2:4
for a bucket only when 2:4 is faster by more than ``margin`` (2% by default) in the mode it runs
in (eager, or graph: captured or compiled), and eagerly by at least :data:`EAGER_MARGIN` (20%):
an eager 2:4 call pays cuSPARSELt's host set-up (~0.5 ms on the lent H100), which varied by ~10%
between runs, so near that cost an eager 2:4 call that the table saw win by 10% lost by 14% in the
next run (11008x4096 at 4096 tokens, bf16). A bucket without a measurement runs dense.

A token count ``T`` (the rows a Linear sees: the product of its input's leading dims) falls in the
largest bucket ``<= T`` (the first bucket below it): the conservative side, as 2:4's advantage grows
with the token count.

Cache file: ``$SPARSETRAIN_CACHE_DIR/runtime/dispatch-<hash of the key>.json`` (default cache dir:
``$XDG_CACHE_HOME/sparsetrain`` or ``~/.cache/sparsetrain``). A file that does not parse or
validate is ignored with a warning and measured again; it never stops a model from loading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import _cslt
from .eligibility import SPARSE_DTYPES

__all__ = [
    "DEFAULT_BUCKETS",
    "DispatchTable",
    "LayerPlan",
    "Timing",
    "bucket_index",
    "cache_dir",
    "clear_cache",
    "device_key",
]

#: Token-count buckets measured by default (a token count falls in the largest bucket <= it).
#: The least fraction of dense's eager time a 2:4 eager call must save to run (see the module doc).
EAGER_MARGIN = 0.20
DEFAULT_BUCKETS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_TIMING_FIELDS = ("dense_eager_ms", "dense_graph_ms", "sparse_eager_ms", "sparse_graph_ms")
_DTYPES = {str(d).removeprefix("torch."): d for d in SPARSE_DTYPES}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call of one layer shape at one token count; ``sparse_*`` None: 2:4 failed there.

    Args:
        dense_eager_ms, dense_graph_ms: the module's dense path (``F.linear``), eager and inside a CUDA graph.
        sparse_eager_ms, sparse_graph_ms: its 2:4 path (``torch._cslt_sparse_mm``), eager and inside a CUDA graph.
        alg_id: the cuSPARSELt algorithm timed (from ``torch._cslt_sparse_mm_search``).
    """

    dense_eager_ms: float
    dense_graph_ms: float
    sparse_eager_ms: float | None
    sparse_graph_ms: float | None
    alg_id: int = 0

    def __post_init__(self) -> None:
        for name in _TIMING_FIELDS:
            value = getattr(self, name)
            if value is None and name.startswith("sparse"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a finite number > 0 (milliseconds), got {value!r}")
        if isinstance(self.alg_id, bool) or not isinstance(self.alg_id, int) or self.alg_id < 0:
            raise ValueError(f"`alg_id` must be an int >= 0, got {self.alg_id!r}")

    def sparse_wins(self, *, graph: bool, margin: float) -> bool:
        """2:4 faster than dense by more than ``margin`` (a fraction of dense's time; eagerly at least
        :data:`EAGER_MARGIN`)."""
        sparse, dense = (self.sparse_graph_ms, self.dense_graph_ms) if graph else (self.sparse_eager_ms,
                                                                                   self.dense_eager_ms)
        margin = margin if graph else max(margin, EAGER_MARGIN)
        return sparse is not None and sparse < dense * (1.0 - margin)


@dataclass(frozen=True)
class LayerPlan:
    """What one layer shape does per bucket: ``sparse_eager[i]`` / ``sparse_graph[i]`` for ``buckets[i]``."""

    buckets: tuple[int, ...]
    sparse_eager: tuple[bool, ...]
    sparse_graph: tuple[bool, ...]
    alg_ids: tuple[int | None, ...]

    def runs_dense_anywhere(self, min_tokens: int = 1) -> bool:
        """True when some bucket a call of ``>= min_tokens`` tokens can fall in runs dense."""
        first = bucket_index(self.buckets, min_tokens)
        return not all(self.sparse_eager[first:]) or not all(self.sparse_graph[first:])

    def runs_sparse_anywhere(self, min_tokens: int = 1) -> bool:
        first = bucket_index(self.buckets, min_tokens)
        return any(self.sparse_eager[first:]) or any(self.sparse_graph[first:])


def bucket_index(buckets: Sequence[int], tokens: int) -> int:
    """Index of the largest bucket ``<= tokens`` (0 below the first bucket).

    A plain loop over a dozen ints (not ``bisect``), so that ``torch.compile`` traces it.
    """
    i = 0
    for j, bucket in enumerate(buckets):
        if bucket <= tokens:
            i = j
    return i


def _check_buckets(buckets: object) -> tuple[int, ...]:
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise ValueError(f"`buckets` must be a sequence of ints >= 1, got {buckets!r}")
    out = tuple(buckets)
    if (not out or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in out)
            or list(out) != sorted(set(out))):
        raise ValueError(f"`buckets` must be strictly increasing ints >= 1, got {buckets!r}")
    return out


def _check_shape_dtype(shape: object, dtype: object) -> tuple[tuple[int, int], torch.dtype]:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"`shape` must be (out_features, in_features) of ints >= 1, got {shape!r}")
    if dtype not in SPARSE_DTYPES:
        raise ValueError(f"`dtype` must be torch.bfloat16 or torch.float16, got {dtype!r}")
    return (int(shape[0]), int(shape[1])), dtype


def cache_dir() -> Path:
    """``$SPARSETRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/sparsetrain``, else ``~/.cache/sparsetrain``."""
    if os.environ.get("SPARSETRAIN_CACHE_DIR"):
        return Path(os.environ["SPARSETRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsetrain"


def clear_cache() -> int:
    """Delete every cached dispatch table (all GPUs); returns how many files were removed."""
    removed = 0
    for path in (cache_dir() / "runtime").glob("dispatch-*.json"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def device_key(device: torch.device | int | str | None = None) -> dict[str, Any]:
    """What a measured table is valid for: GPU name and capability, torch, CUDA and cuSPARSELt versions."""
    if not torch.cuda.is_available():
        raise RuntimeError("measuring a dispatch table needs CUDA, and torch.cuda.is_available() is False")
    index = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": _cslt.version(),
    }


def _key_path(key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "runtime" / f"dispatch-{digest}.json"


class DispatchTable:
    """Timings per (shape, dtype, bucket) and the 2:4-or-dense decision they imply.

    Args:
        key: what the timings are valid for (:func:`device_key`); None for a table built by hand.
        buckets: token-count buckets, strictly increasing (default :data:`DEFAULT_BUCKETS`).
        margin: 2:4 runs only where it is faster than dense by more than this fraction.
        path: where :meth:`save` writes (None: not saved).

    Example::

        table = DispatchTable.cached()                  # this GPU's table, from disk or empty
        table.measure([((4096, 4096), torch.bfloat16)])  # measures what is missing, saves
        table.plan((4096, 4096), torch.bfloat16).sparse_graph
    """

    VERSION = 2  # 2: timings through Sparse24Linear's own paths (1: the raw calls)

    def __init__(self, *, key: Mapping[str, Any] | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 margin: float = 0.02, path: str | os.PathLike | None = None) -> None:
        if key is not None and not isinstance(key, Mapping):
            raise TypeError(f"`key` must be a mapping or None, got {type(key).__name__}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < 1.0:
            raise ValueError(f"`margin` must be in [0, 1), got {margin!r}")
        self.key = dict(key) if key is not None else None
        self.buckets = _check_buckets(buckets)
        self.margin = float(margin)
        self.path = Path(path) if path is not None else None
        self._entries: dict[tuple[tuple[int, int], torch.dtype], dict[int, Timing]] = {}

    # ------------------------------------------------------------------ entries and decisions
    def set(self, shape: tuple[int, int], dtype: torch.dtype, tokens: int, timing: Timing) -> None:
        """Record ``timing`` for one bucket (``tokens`` must be one of :attr:`buckets`)."""
        shape, dtype = _check_shape_dtype(shape, dtype)
        if tokens not in self.buckets:
            raise ValueError(f"`tokens` must be one of the buckets {self.buckets}, got {tokens!r}")
        if not isinstance(timing, Timing):
            raise TypeError(f"`timing` must be a Timing, got {type(timing).__name__}")
        self._entries.setdefault((shape, dtype), {})[tokens] = timing

    def get(self, shape: tuple[int, int], dtype: torch.dtype, tokens: int) -> Timing | None:
        """The timing of the bucket ``tokens`` falls in, or None when not measured."""
        shape, dtype = _check_shape_dtype(shape, dtype)
        bucket = self.buckets[bucket_index(self.buckets, tokens)]
        return self._entries.get((shape, dtype), {}).get(bucket)

    def missing(self, shape: tuple[int, int], dtype: torch.dtype) -> list[int]:
        """Buckets not yet measured for this shape and dtype."""
        shape, dtype = _check_shape_dtype(shape, dtype)
        have = self._entries.get((shape, dtype), {})
        return [b for b in self.buckets if b not in have]

    def plan(self, shape: tuple[int, int], dtype: torch.dtype) -> LayerPlan:
        """Per bucket: 2:4 in eager mode, 2:4 in graph mode, the algorithm (dense where unmeasured)."""
        shape, dtype = _check_shape_dtype(shape, dtype)
        have = self._entries.get((shape, dtype), {})
        timings = [have.get(b) for b in self.buckets]
        return LayerPlan(
            buckets=self.buckets,
            sparse_eager=tuple(t is not None and t.sparse_wins(graph=False, margin=self.margin) for t in timings),
            sparse_graph=tuple(t is not None and t.sparse_wins(graph=True, margin=self.margin) for t in timings),
            alg_ids=tuple(None if t is None else t.alg_id for t in timings),
        )

    def sparse_wins(self, shape: tuple[int, int], dtype: torch.dtype, tokens: int, *, graph: bool) -> bool:
        """The decision for one call of ``tokens`` tokens."""
        plan = self.plan(shape, dtype)
        i = bucket_index(plan.buckets, tokens)
        return (plan.sparse_graph if graph else plan.sparse_eager)[i]

    # ------------------------------------------------------------------ measuring
    def measure(self, layers: Iterable[tuple[tuple[int, int], torch.dtype]], *,
                device: torch.device | str | None = None, reps: int = 10, save: bool = True) -> int:
        """Measure every missing bucket of ``layers`` (``((out, in), dtype)`` pairs) on ``device``.

        Returns the number of buckets measured; saves to :attr:`path` when one was and ``save``.

        Raises:
            RuntimeError: no CUDA, or the table's key is another GPU's or torch's.
        """
        todo = []
        for shape, dtype in layers:
            shape, dtype = _check_shape_dtype(shape, dtype)
            todo.extend((shape, dtype, b) for b in self.missing(shape, dtype))
        if not todo:
            return 0
        key = device_key(device)
        if self.key is None:
            self.key = key
        elif self.key != key:
            raise RuntimeError(f"this table was measured for {self.key}, not for this device ({key})")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        with torch.cuda.device(dev):
            for shape, dtype, tokens in dict.fromkeys(todo):
                self.set(shape, dtype, tokens, measure_timing(shape, dtype, tokens, device=dev, reps=reps))
        if save and self.path is not None:
            self.save()
        return len(todo)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        entries: dict[str, dict[str, Any]] = {}
        for ((out_f, in_f), dtype), per in sorted(self._entries.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            entries[f"{_dtype_name(dtype)}:{out_f}x{in_f}"] = {str(b): asdict(t) for b, t in sorted(per.items())}
        return {"version": self.VERSION, "key": self.key, "buckets": list(self.buckets), "margin": self.margin,
                "entries": entries}

    @classmethod
    def from_dict(cls, data: Any, *, path: str | os.PathLike | None = None) -> DispatchTable:
        """Rebuild a table from :meth:`to_dict`'s output, validating every field.

        Raises:
            ValueError: anything malformed, naming it.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a dispatch table must be a JSON object, got {type(data).__name__}")
        if data.get("version") != cls.VERSION:
            raise ValueError(f"dispatch table version {data.get('version')!r} is not {cls.VERSION}")
        key = data.get("key")
        if key is not None and not isinstance(key, dict):
            raise ValueError(f"`key` must be an object or null, got {key!r}")
        table = cls(key=key, buckets=data.get("buckets", ()), margin=data.get("margin", 0.02), path=path)
        entries = data.get("entries")
        if not isinstance(entries, dict):
            raise ValueError(f"`entries` must be an object, got {type(entries).__name__}")
        for name, per in entries.items():
            dtype_name, _, dims = str(name).partition(":")
            out_s, _, in_s = dims.partition("x")
            if dtype_name not in _DTYPES or not out_s.isdigit() or not in_s.isdigit():
                raise ValueError(f"entry {name!r}: expected '<bfloat16|float16>:<out>x<in>'")
            if not isinstance(per, dict):
                raise ValueError(f"entry {name!r} must be an object of buckets")
            for bucket, fields in per.items():
                if not str(bucket).isdigit():
                    raise ValueError(f"entry {name!r}: bucket {bucket!r} is not an int")
                if not isinstance(fields, dict) or set(fields) != {*_TIMING_FIELDS, "alg_id"}:
                    expected = sorted({*_TIMING_FIELDS, "alg_id"})
                    raise ValueError(f"entry {name!r} bucket {bucket}: expected fields {expected}")
                try:
                    timing = Timing(**fields)
                    table.set((int(out_s), int(in_s)), _DTYPES[dtype_name], int(bucket), timing)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"entry {name!r} bucket {bucket}: {err}") from None
        return table

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the table as JSON (atomically: a temporary file renamed over the old one)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("`path` must be given: this table has no path")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dispatch-", suffix=".json", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1, allow_nan=False)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, *, key: Mapping[str, Any] | None = None) -> DispatchTable:
        """Read a table written by :meth:`save`; with ``key``, it must be the one stored.

        Raises:
            ValueError: the file is not valid JSON, not a valid table, or for another key.
            OSError: the file cannot be read.
        """
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"not valid JSON ({err})") from None
        table = cls.from_dict(data, path=path)
        if key is not None and table.key != dict(key):
            raise ValueError(f"measured for {table.key}, not for {dict(key)}")
        return table

    @classmethod
    def cached(cls, device: torch.device | str | None = None, *, buckets: Sequence[int] = DEFAULT_BUCKETS,
               path: str | os.PathLike | None = None, key: Mapping[str, Any] | None = None) -> DispatchTable:
        """This GPU's table from the cache (or ``path``), or an empty one that saves there.

        ``key`` defaults to :func:`device_key` of ``device``. A cache file that cannot be read, does
        not validate, is for another key or for other buckets is ignored with a warning (and
        overwritten at the next :meth:`measure`).
        """
        if key is not None and not isinstance(key, Mapping):
            raise TypeError(f"`key` must be a mapping or None, got {type(key).__name__}")
        key = dict(key) if key is not None else device_key(device)
        target = Path(path) if path is not None else _key_path(key)
        if target.exists():
            try:
                table = cls.load(target, key=key)
                if table.buckets != _check_buckets(buckets):
                    raise ValueError(f"buckets {table.buckets}, not {tuple(buckets)}")
                return table
            except (OSError, ValueError, UnicodeDecodeError) as err:
                warnings.warn(f"ignoring the dispatch table cache {target}: {err}; measuring again", stacklevel=2)
        return cls(key=key, buckets=buckets, path=target)


def measure_timing(shape: tuple[int, int], dtype: torch.dtype, tokens: int, *, device: torch.device,
                   reps: int = 10) -> Timing:
    """Time dense and 2:4 for one layer shape (no bias) at ``tokens`` rows, eager and in a CUDA graph.

    Both are timed through :class:`~sparsetrain.runtime.Sparse24Linear`'s own dense and 2:4 paths, so
    that an eager decision counts the host work the module really does on each (at a few tokens an
    eager call is host-bound, and the 2:4 path does more of it).
    """
    from .linear import Sparse24Linear
    from .timing import cuda_ms

    out_f, in_f = shape
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen)
    weight.view(out_f, in_f // 4, 4)[..., 2:] = 0
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
    dense = Sparse24Linear(weight, backend="dense")
    dense_eager = cuda_ms(lambda: dense(x), reps=reps)
    dense_graph = cuda_ms(lambda: dense(x), reps=reps, graph=True)
    try:  # 2:4 on every call; the first (eager, in the warm-up) searches the algorithm
        sparse = Sparse24Linear(weight, plan=LayerPlan(buckets=(1,), sparse_eager=(True,), sparse_graph=(True,),
                                                       alg_ids=(None,)))
        sparse_eager = cuda_ms(lambda: sparse(x), reps=reps)
        sparse_graph = cuda_ms(lambda: sparse(x), reps=reps, graph=True)
    except RuntimeError as err:  # cuSPARSELt refused this shape: dense there
        warnings.warn(f"2:4 failed for {out_f}x{in_f} {_dtype_name(dtype)} at {tokens} tokens: {err}", stacklevel=2)
        return Timing(dense_eager_ms=dense_eager, dense_graph_ms=dense_graph, sparse_eager_ms=None,
                      sparse_graph_ms=None)
    return Timing(dense_eager_ms=dense_eager, dense_graph_ms=dense_graph, sparse_eager_ms=sparse_eager,
                  sparse_graph_ms=sparse_graph, alg_id=sparse._alg_ids[0])
