"""Lightning callbacks: thin adapters over the sparsetrain core."""

from .compression import GradientCompression
from .dynamic_sparsity import DynamicSparsity
from .export import SparseExport
from .masked_exchange import MaskedExchange
from .moe import MoEMonitor
from .nm_sparsity import NMSparsity

__all__: list[str] = ["DynamicSparsity", "GradientCompression", "MaskedExchange", "MoEMonitor", "NMSparsity",
                     "SparseExport"]
