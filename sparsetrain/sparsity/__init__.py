"""Dynamic sparse training: RigL, SET, gradual magnitude pruning, static masks and Top-KAST.

Pure functions (densities, schedules, mask updates) and :class:`DynamicSparsifier`, the
stateful object that keeps masks, keeps weights and optimizer states zero outside them and
updates them on schedule, from a plain PyTorch loop. Modules: :mod:`.config` (the config),
:mod:`.dynamic` (the sparsifier), :mod:`.update` (the grouped mask update), :mod:`.enforcement`
(when masks must be re-applied), :mod:`.masks`, :mod:`.rigl`, :mod:`.set`, :mod:`.gmp`, :mod:`.density`,
:mod:`.schedules`, :mod:`.topkast` (Top-KAST's sets, penalty and sparsifier), :mod:`.stacked` (MoE expert
stacks ``[E, ...]``: selection by parameter name, densities, masks and updates per expert slice). The
Lightning adapter is :class:`sparsetrain.callbacks.DynamicSparsity`; DeepSpeed ZeRO-1/2 support is in
:mod:`sparsetrain.sparsity.deepspeed` (imported on demand).
"""

from .config import DynamicSparsityConfig
from .density import DISTRIBUTIONS, layer_active_counts, layer_densities
from .dynamic import MASK_NAME, DynamicSparsifier, MaskDivergenceError
from .enforcement import ZERO_PRESERVING_OPTIMIZERS
from .gmp import magnitude_prune
from .masks import DEFAULT_MODULE_TYPES, drop_smallest, grow_mask, keep_largest, random_mask, select_modules
from .rigl import rigl_update
from .schedules import DROP_SCHEDULES, METHODS, MaskSchedule, cosine_drop_fraction, gmp_sparsity
from .set import set_update
from .topkast import TopKastSparsifier, exploration_penalty, exploration_penalty_grad, topkast_sets

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "DISTRIBUTIONS",
    "DROP_SCHEDULES",
    "MASK_NAME",
    "METHODS",
    "ZERO_PRESERVING_OPTIMIZERS",
    "DynamicSparsifier",
    "DynamicSparsityConfig",
    "MaskDivergenceError",
    "MaskSchedule",
    "TopKastSparsifier",
    "cosine_drop_fraction",
    "drop_smallest",
    "exploration_penalty",
    "exploration_penalty_grad",
    "gmp_sparsity",
    "grow_mask",
    "keep_largest",
    "layer_active_counts",
    "layer_densities",
    "magnitude_prune",
    "random_mask",
    "rigl_update",
    "select_modules",
    "set_update",
    "topkast_sets",
]
