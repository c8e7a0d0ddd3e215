"""The embedded demo: model and data every recipe falls back to, with no download.

Plain PyTorch here; the Lightning wrappers live in :mod:`sparsetrain.demo.lightning`.
"""

from .data import VOCAB_SIZE, CharDataset, CorpusConfig, load_corpus, make_datasets, stdlib_files
from .mlp import MLPClassifier, make_classification
from .model import GPT, GPTConfig

__all__ = [
    "GPT",
    "VOCAB_SIZE",
    "CharDataset",
    "CorpusConfig",
    "GPTConfig",
    "MLPClassifier",
    "load_corpus",
    "make_classification",
    "make_datasets",
    "stdlib_files",
]
