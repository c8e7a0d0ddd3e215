"""Top-k gradient compression with error feedback and DGC momentum correction.

- :class:`DGCState` / :func:`dgc_hook`: the component and its DDP communication hook
  (``ddp.register_comm_hook``), in :mod:`.dgc`;
- :class:`CompressionEngine`: the algorithm and one rank's residuals and momenta, keyed by
  parameter name, which the DDP hook, the Horovod optimizer and other exchanges drive
  (compress a flat buffer -> :class:`Message`; decompress; commit), in :mod:`.engine`;
- :class:`DGCConfig`, :class:`BucketLayout`, :func:`plan_bucket`: the options, the density
  schedule and the cost rule, in :mod:`.plan`;
- :class:`MaskedExchange` / :func:`masked_hook`: the sparsity-aware exchange (only the entries inside
  the gradient masks travel; optionally DGC top-k on them), in :mod:`.masked`;
- :mod:`.topk`: exact and sampled-threshold selection, :mod:`.wire`: the packed message;
- :func:`sparsetrain.compression.horovod.DistributedOptimizer`: the same over ``hvd.allgather``
  (imported on demand, so Horovod stays optional).
"""

from .dgc import DGCState, check_optimizer, dgc_hook
from .engine import CompressionEngine, Message
from .masked import MaskedExchange, MaskedExchangeConfig, masked_hook
from .plan import DENSITY_RAMP, MATH_FIELDS, BucketLayout, DGCConfig, plan_bucket
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
    "MATH_FIELDS",
    "BucketLayout",
    "CompressionEngine",
    "DGCConfig",
    "DGCState",
    "MaskedExchange",
    "MaskedExchangeConfig",
    "Message",
    "check_optimizer",
    "dgc_hook",
    "masked_hook",
    "num_selected",
    "plan_bucket",
    "sample_stride",
    "select_indices",
    "threshold_indices",
    "threshold_indices_segments",
    "topk_indices",
]
