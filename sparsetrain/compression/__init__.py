"""Top-k gradient compression with error feedback and DGC momentum correction.

- :func:`dgc_hook` / :class:`DGCState`: a DDP communication hook (``ddp.register_comm_hook``),
- :class:`DGCConfig`: its options, shared by the Lightning callback and the Horovod optimizer,
- :mod:`.topk`: exact and sampled-threshold selection, :mod:`.wire`: the packed message,
- :func:`sparsetrain.compression.horovod.DistributedOptimizer`: the same over ``hvd.allgather``
  (imported on demand, so Horovod stays optional).
"""

from .dgc import DENSITY_RAMP, DGCConfig, DGCState, check_optimizer, dgc_hook
from .topk import (
    num_selected,
    sample_stride,
    select_indices,
    threshold_indices,
    threshold_indices_segments,
    topk_indices,
)

__all__ = [
    "DENSITY_RAMP",
    "DGCConfig",
    "DGCState",
    "check_optimizer",
    "dgc_hook",
    "num_selected",
    "sample_stride",
    "select_indices",
    "threshold_indices",
    "threshold_indices_segments",
    "topk_indices",
]
