"""What each part of pix2tex needs beyond the core install, and a clear error when it is missing.

`pip install pix2tex` installs what reading formulas needs (onnxruntime, tokenizers, Pillow, numpy);
training, evaluation, distillation, export and the torch backend need the `train` extra, the
HTTP service the `serve` extra.
"""
from __future__ import annotations

import importlib.util

# the import name that stands for each extra, and what to install for it
EXTRAS = {
    "train": ("torch", "pip install 'pix2tex[train]'  (PyTorch, timm, x-transformers, ...)"),
    "serve": ("fastapi", "pip install 'pix2tex[serve]'  (FastAPI, uvicorn)"),
}


def has(extra: str) -> bool:
    """Whether the extra's packages are installed (without importing them)."""
    return importlib.util.find_spec(EXTRAS[extra][0]) is not None


def require(extra: str, user: str) -> None:
    """Raise ModuleNotFoundError naming the extra to install when `user` (a module or feature)
    cannot run in this install."""
    if not has(extra):
        module, install = EXTRAS[extra]
        raise ModuleNotFoundError(f"{user} needs {module}, which this install of pix2tex does not "
                                  f"have: {install}", name=module)
