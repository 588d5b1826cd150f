"""Data for training: BPE tokenizer over LaTeX, image transforms, the bucketed image dataset.

Names are imported lazily (PEP 562), so `python -m pix2tex.dataset.tokenizer` runs without
importing torch and without runpy's "found in sys.modules" warning.
"""
import importlib

_EXPORTS = {
    "Im2LatexDataset": "dataset", "BuildReport": "dataset",
    "DatasetError": "dataset", "Sample": "dataset", "generate_tokenizer": "dataset",
    "LatexTokenizer": "tokenizer", "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "TokenizerError": "tokenizer", "PAD_ID": "tokenizer", "BOS_ID": "tokenizer", "EOS_ID": "tokenizer",
    "UNK_ID": "tokenizer",
    "MEAN": "transforms", "STD": "transforms", "train_transform": "transforms",
    "test_transform": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
