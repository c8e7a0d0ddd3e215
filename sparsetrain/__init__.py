"""sparsetrain: sparse distributed training for PyTorch.

The core (this package) is plain PyTorch; Lightning callbacks live in
:mod:`sparsetrain.callbacks`, the multi-node launcher in :mod:`sparsetrain.launch`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
