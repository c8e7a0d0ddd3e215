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
- the DDP model goes (a function returns): its reducer, the last holder of the process group, runs
  ``~ProcessGroupGloo`` with the GIL held, which locks the group's work mutex and joins its threads.
  A worker thread drops a finished work (``workInProgress_[i].reset()`` in ``runLoop``) *with that
  mutex held*, so if the work's destructor needs the GIL, the two threads wait for each other.

So gloo's threads must never be the ones to free a Python object. Everything sparsetrain hands to a
gloo collective goes through :func:`handed`: a tensor as a fresh alias (same storage, so an
in-place collective still writes the caller's tensor), a callback as itself, and this module keeps
a reference to each. While gloo holds the object, its reference count is one above what this module
holds; gloo letting go only takes it back down (a ``Py_DECREF`` done whole under the GIL), never to
zero. :func:`wait_for_release` waits, with the GIL released, until every handed object is held by
this module alone, then drops them on the calling thread: after each blocking collective, at the
start of a component's ``step()`` (for what the DDP hooks of that optimizer step handed gloo), and
at exit (exit handlers run before the interpreter starts shutting down). Once it returns, gloo's
threads need the GIL for nothing sparsetrain gave them. Collectives on other backends are handed
through untouched.

Watching with weak references instead (an earlier version) is not enough: a weak reference dies at
the *start* of the object's deallocation, on gloo's thread; a tensor's deallocation
(``THPVariable_clear``) then releases and re-takes the GIL, still inside ``runLoop``'s locked
``reset()``. The main thread saw nothing watched, dropped the DDP model, and hung in
``~ProcessGroupGloo`` on the work mutex (about 1 run in 70, ``tests/sparsetrain/gloo_exit_driver.py
N dropped``).
"""

from __future__ import annotations

import atexit
import itertools
import sys
import threading
import time
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["handed", "wait_for_release"]

T = TypeVar("T")

#: How long :func:`wait_for_release` waits at most (a collective whose peer died never completes).
TIMEOUT_S = 10.0

#: What gloo was handed, kept here so that gloo's threads never drop the last reference.
_held: dict[int, Any] = {}
_keys = itertools.count()
_registered = False
_lock = threading.Lock()


def _own_count() -> int:
    """``sys.getrefcount`` of an object referenced by ``_held`` alone, as :func:`_let_go` reads it."""
    key = next(_keys)
    _held[key] = object()
    try:
        return sys.getrefcount(_held.get(key))
    finally:
        del _held[key]


_OWN = _own_count()


def _is_gloo(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "gloo"


def handed(obj: T, group: Any = None) -> T:
    """What to hand a collective on ``group`` (or ``fut.then``): held here until gloo lets it go.

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
    if threading.current_thread() is threading.main_thread():
        _let_go()  # what earlier collectives no longer hold; never on gloo's threads (a callback's)
    _held[next(_keys)] = obj
    global _registered
    if not _registered:
        with _lock:
            if not _registered:
                atexit.register(wait_for_release)
                _registered = True
    return obj


def _let_go() -> bool:
    """Drop, on this thread, what only this module still holds; True when nothing is held."""
    for key in list(_held):
        if sys.getrefcount(_held.get(key)) <= _OWN:
            _held.pop(key, None)
    return not _held


def wait_for_release(timeout: float = TIMEOUT_S) -> bool:
    """Wait, with the GIL released, until gloo has let go of everything :func:`handed` gave it.

    Call it where no collective of sparsetrain's is in flight (it would wait for that one too);
    it returns at once when nothing is held. It is also registered to run at exit.

    Args:
        timeout: the most seconds to wait (``>= 0``).

    Returns:
        True when nothing handed to gloo is held any more, False after ``timeout`` seconds.

    Raises:
        ValueError: if ``timeout`` is negative.
    """
    if not timeout >= 0:
        raise ValueError(f"`timeout` must be >= 0 seconds, got {timeout!r}")
    deadline = time.monotonic() + timeout
    spins = 0
    while not _let_go():
        if time.monotonic() >= deadline:
            return False
        # Sleeping releases the GIL, and a gloo thread waiting for it takes it: at once on another
        # core (a zero sleep), after a short real sleep when both compete for one core.
        time.sleep(0 if spins < 50 else 1e-4)
        spins += 1
    return True
