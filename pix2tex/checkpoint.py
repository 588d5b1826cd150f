"""Checkpoints: one plain dict per file, written atomically, loaded with `weights_only=True`.

A training checkpoint holds `model`, `optimizer`, `scheduler`, `scaler`, `rng`, `epoch`, `step`,
`batch_in_epoch`, `best`, `config` (plain dict) and `tokenizer` (path). A LaTeX-OCR weights file
(a bare state dict) loads too, for `load_model_weights`.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to `path` through a temporary file in the same folder and a rename, so a
    crash at any moment leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint dict (or a bare state dict) with the safe, weights-only unpickler."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None


def model_state(ckpt: dict) -> dict:
    """The model's state dict inside a checkpoint dict, or the dict itself if it is a bare one."""
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"]
    return ckpt


def load_model_weights(model: torch.nn.Module, ckpt: dict | str | os.PathLike, source: str = "") -> None:
    """Load weights into `model`; a shape or key mismatch names the checkpoint and the keys."""
    if not isinstance(ckpt, dict):
        source = source or os.fspath(ckpt)
        ckpt = load_checkpoint(ckpt)
    state = model_state(ckpt)
    # torch.compile and DDP prefix parameter names; strip them so any checkpoint loads anywhere.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            detail.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]))
        if missing:
            detail.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source or 'checkpoint'} does not fit this model's architecture "
                              f"({'; '.join(detail)}); use the config it was trained with")
    model.load_state_dict(state)
