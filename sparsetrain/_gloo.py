"""What a gloo collective is handed, and waiting until gloo has let go of it.

Gloo runs every collective on a worker thread of its own, and that thread drops its references to
the collective's tensors, and to the Python callbacks of its future (``fut.then(fn)``), just *after*
the collective completes. Dropping them takes the GIL: torch decrefs a tensor's Python object when
its C++ count falls to one, and a callback is a Python object. Right after the last collective of a
run the main thread usually holds the GIL, and two things can follow while the worker thread waits
for it:

- the interpreter shuts down (``destroy_process_group()``, then the end of the script): the worker
  thread can no longer take the GIL, Python ends it inside a ``noexcept`` destructor, and the
  process aborts with "terminate called without an active exception" (SIGABRT) after the program
  itself finished;
- the DDP model goes (a function returns): its reducer, the last holder of the process group,
  joins gloo's threads without releasing the GIL, and the process hangs.

So everything sparsetrain hands to a gloo collective goes through :func:`handed`: a tensor as a
fresh alias (same storage, so an in-place collective still writes the caller's tensor) that only
gloo keeps, a callback as itself; each is watched through a weak reference, which dies exactly when
gloo lets go of it. :func:`wait_for_release` waits, with the GIL released, until every watched
object is gone: after each blocking collective, at the start of a component's ``step()`` (for what
the DDP hooks of that optimizer step handed gloo), and at exit (exit handlers run before the
interpreter starts shutting down). Collectives on other backends are handed through untouched.

Limit: dropping the DDP model when a function returns, right after ``destroy_process_group()``, still
hung in about 1 of 70 runs on a loaded machine (``tests/sparsetrain/gloo_exit_driver.py N dropped``):
something gloo holds there is not handed through this module yet.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["handed", "wait_for_release"]

T = TypeVar("T")

#: How long :func:`wait_for_release` waits at most (a collective whose peer died never completes).
TIMEOUT_S = 10.0

_watched: dict[int, weakref.ref] = {}
_keys = itertools.count()
_registered = False
_lock = threading.Lock()


def _is_gloo(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "gloo"


def handed(obj: T, group: Any = None) -> T:
    """What to hand a collective on ``group`` (or ``fut.then``): watched until gloo lets it go.

    Args:
        obj: a tensor given to the collective (returns an alias of it: pass the alias and keep
            using ``obj``), or a callback given to the collective's future (returned as is; the
            caller must not keep another reference to it).
        group: the collective's process group (default: the default group).

    Returns:
        ``obj`` itself unless ``group`` is a gloo group; else an alias of a tensor, or the callback.
    """
    if not _is_gloo(group):
        return obj
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()  # a new tensor on the same storage, referenced only by gloo once passed
    _watch(obj)
    return obj


def _watch(obj: Any) -> None:
    global _registered
    key = next(_keys)
    # The callback runs on the thread that drops the last reference (gloo's, holding the GIL).
    _watched[key] = weakref.ref(obj, lambda _, key=key: _watched.pop(key, None))
    if not _registered:
        with _lock:
            if not _registered:
                atexit.register(wait_for_release)
                _registered = True


def wait_for_release(timeout: float = TIMEOUT_S) -> bool:
    """Wait, with the GIL released, until gloo has let go of everything :func:`handed` gave it.

    Call it where no collective of sparsetrain's is in flight (it would wait for that one too);
    it returns at once when nothing is held. It is also registered to run at exit.

    Returns:
        True when nothing handed to gloo is held any more, False after ``timeout`` seconds.
    """
    if not _watched:
        return True
    deadline = time.monotonic() + timeout
    spins = 0
    while _watched:
        if time.monotonic() >= deadline:
            return False
        # Sleeping releases the GIL, and a gloo thread waiting for it takes it: at once on another
        # core (a zero sleep), after a short real sleep when both compete for one core.
        time.sleep(0 if spins < 50 else 1e-4)
        spins += 1
    return True
