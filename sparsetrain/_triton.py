"""Triton kernels built on first use, for the modules that have a Triton path beside a torch one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def build_once(current: Any, build: Callable[[], Any]) -> Any:
    """``current`` when the kernels were already built (or found missing); else ``build()``, which
    imports Triton and returns the kernels, or False where that fails (the caller takes the torch path)."""
    if current is not None:
        return current
    try:
        return build()
    except Exception:  # noqa: BLE001 - no Triton (or no working one): the torch path runs instead
        return False
