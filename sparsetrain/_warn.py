"""Warnings said once per run: by rank 0 of a multi-process run, or by the only process.

Every rank runs the same code on the same model and configuration, so a warning about either (a
layer skipped, a schedule that never fires, a deprecated argument) would otherwise be printed once
per process. The core and the callbacks warn through :func:`warn`; a warning that can differ
between ranks (one rank's own data or files) keeps ``warnings.warn``.
"""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist

__all__ = ["rank", "warn"]

# The variables launchers set for a process's rank, in the order Lightning reads them: a warning
# said before the process group exists (constructing a component) is still said by rank 0 only.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def rank() -> int:
    """This process's rank: the default group's once it exists, else the launcher's, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in _RANK_VARIABLES:
        value = os.environ.get(var, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def warn(message: str | Warning, category: type[Warning] = UserWarning, stacklevel: int = 1) -> None:
    """``warnings.warn`` on rank 0 only (see :func:`rank`); ``stacklevel`` counts from the caller."""
    if rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
