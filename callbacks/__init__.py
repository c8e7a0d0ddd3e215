"""Lightning callbacks: thin adapters over the sparsetrain core."""

from .nm_sparsity import NMSparsity

__all__: list[str] = ["NMSparsity"]
