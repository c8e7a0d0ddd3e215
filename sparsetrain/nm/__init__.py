"""N:M sparsity: masks along the GEMM reduction dim, training methods (STE, SR-STE, MDGF, SDGF),
the exact N:M exported view, and channel permutation for pruning dense models to N:M.

See ``docs/nm_sparsity.md``.
"""

from .config import NMConfig
from .export import nm_exact, nm_export_checkpoint, nm_export_state_dict
from .masks import (
    check_nm,
    is_nm,
    kept_magnitude,
    nm_mask,
    nm_masks,
    pack_mask,
    reduction_dim,
    select_nm_layers,
    unpack_mask,
)
from .methods import NMMask, masked_weight, mdgf_beta, sdgf_ladder, sdgf_pattern
from .permute import (
    PermutationSite,
    apply_channel_permutation,
    find_permutation_sites,
    permute_for_nm,
    prune_to_nm,
    search_channel_permutation,
)
from .schedule import NMSchedule
from .sparsifier import NMSparsifier
from .strategies import ForwardMasks, InPlace, MaskingStrategy, Parametrized

__all__ = [
    "ForwardMasks",
    "InPlace",
    "MaskingStrategy",
    "NMConfig",
    "NMMask",
    "NMSchedule",
    "NMSparsifier",
    "Parametrized",
    "PermutationSite",
    "apply_channel_permutation",
    "find_permutation_sites",
    "check_nm",
    "is_nm",
    "kept_magnitude",
    "masked_weight",
    "mdgf_beta",
    "nm_exact",
    "nm_export_checkpoint",
    "nm_export_state_dict",
    "nm_mask",
    "nm_masks",
    "pack_mask",
    "permute_for_nm",
    "prune_to_nm",
    "reduction_dim",
    "sdgf_ladder",
    "sdgf_pattern",
    "search_channel_permutation",
    "select_nm_layers",
    "unpack_mask",
]
