"""The GradScaler's current loss scale as a device tensor, read without waiting for the device.

``GradScaler.get_scale()`` (the public path) returns a Python float: a host sync at every step.
The scale already lives in the private tensor ``GradScaler._scale``; it is read here, and only here,
with the public path as the fallback where the attribute is missing (not yet initialised, or a
torch that renamed it). ``tests/sparsetrain/compression/test_loss_scale.py`` fails when torch stops
keeping the scale there, and holds this path to the public one.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["current_scale"]


def current_scale(scaler: Any, device: torch.device) -> torch.Tensor:
    """The loss scale of ``scaler`` as a 0-dim float32 tensor on ``device``."""
    cur = getattr(scaler, "_scale", None)
    if not isinstance(cur, torch.Tensor):
        cur = torch.tensor(float(scaler.get_scale()))
    return cur.detach().to(device=device, dtype=torch.float32).reshape(())
