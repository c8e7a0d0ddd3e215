"""Dynamic sparsity on stacked expert weights: densities, masks and updates per expert slice.

The functions live in :mod:`sparsetrain.sparsity.stacked` (the dynamic-sparsity package owns them, and
:class:`~sparsetrain.sparsity.DynamicSparsifier` uses them when its ``include`` names expert stacks,
``"*.experts.w1_EFD"``); they are re-exported here under the names the MoE package has always used.
Legend: E experts (the stacked dimension), ``...`` one expert's weight shape (``F x D`` for ``w1_EFD``).
"""

from __future__ import annotations

from ..sparsity.stacked import (
    expert_active_counts,
    expert_densities,
    expert_random_masks,
    expert_slice_shapes,
    update_expert_masks,
)

__all__ = ["expert_active_counts", "expert_densities", "expert_random_masks", "expert_slice_shapes",
           "update_expert_masks"]
