"""Checkpoints: one plain dict per file, written atomically, loaded with `weights_only=True`.

A training checkpoint holds `model`, `optimizer`, `scheduler`, `rng`, `epoch`, `step`,
`batch_in_epoch`, `best`, `config` (plain dict) and `tokenizer` (path). A bare state dict loads
too, and so does a LaTeX-OCR weights file (`from_latex_ocr`): its encoder's weights have our names
and shapes; its decoder (x-transformers 0.15) names some weights differently and has biases in
every layer norm, in the attention outputs and in the logits, which x-transformers 2.x dropped.
Loading one gives the model those biases (`decoder_bias`) and renames the rest, so it computes
LaTeX-OCR's outputs.
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import os
import re
from typing import Any

import torch

from pix2tex.fileio import atomic_open


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` to `path` through a temporary file in the same folder and a rename, so a
    crash at any moment leaves either the old file or the new one, never a torn one."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


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
    if is_latex_ocr(state):
        state = from_latex_ocr(state, model)
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


def is_latex_ocr(state: dict) -> bool:
    """A LaTeX-OCR (x-transformers 0.15) state dict: its token embedding is a bare nn.Embedding."""
    return "decoder.net.token_emb.weight" in state and "decoder.net.token_emb.emb.weight" not in state


# LaTeX-OCR decoder names -> ours (x-transformers 0.15 -> 2.x), applied in order
_LATEX_OCR_NAMES = [
    (r"decoder\.net\.token_emb\.weight$", "decoder.net.token_emb.emb.weight"),
    (r"decoder\.net\.norm\.weight$", "decoder.net.attn_layers.final_norm.gamma"),
    (r"decoder\.net\.norm\.bias$", "decoder.net.attn_layers.final_norm.beta"),
    (r"(decoder\.net\.attn_layers\.layers\.\d+)\.0\.weight$", r"\1.0.0.gamma"),  # pre-norms
    (r"(decoder\.net\.attn_layers\.layers\.\d+)\.0\.bias$", r"\1.0.0.beta"),
    (r"(decoder\.net\.attn_layers\.layers\.\d+\.1)\.net\.", r"\1.ff."),  # feed-forwards
]


def from_latex_ocr(state: dict, model: torch.nn.Module) -> dict:
    """A LaTeX-OCR weights file's state dict with this model's names. Its decoder's biases need
    `decoder_bias`: a model built without them gains them here (zero until loaded). x-transformers
    2.x scales the position embedding by dim^-0.5 where 0.15 did not, so the table is divided by
    that scale."""
    decoder = model.decoder
    if not decoder.has_bias:
        decoder.add_biases()
    out = {}
    for key, value in state.items():
        for pattern, replacement in _LATEX_OCR_NAMES:
            key = re.sub(f"^{pattern}", replacement, key)
        out[key] = value
    pos = "decoder.net.pos_emb.emb.weight"
    if pos in out:
        out[pos] = out[pos] / decoder.net.pos_emb.scale
    return out


# --- what a resume needs ----------------------------------------------------------------------

# Config keys that fix the shapes of the model's weights: a checkpoint trained with other values
# cannot be resumed (or fine-tuned) with this config.
ARCH_KEYS = ("encoder_structure", "backbone_layers", "dim", "encoder_depth", "encoder_heads",
             "num_layers", "heads", "max_seq_len", "num_tokens", "patch_size", "channels",
             "max_height", "max_width", "decoder_args", "decoder_bias")


def rng_state() -> dict:
    """Every random generator a training step may draw from: python, numpy, torch, CUDA."""
    import random

    import numpy as np

    state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        # numpy's key array as a tensor: the weights-only unpickler accepts tensors, not ndarrays
        "numpy": {"bit_generator": state["bit_generator"],
                  "key": torch.from_numpy(state["state"]["key"].astype("int64")),
                  "pos": state["state"]["pos"], "has_gauss": state["has_gauss"],
                  "gauss": state["gauss"]},
        "torch": torch.get_rng_state(),
        # this process's own GPU only (under DDP each rank has one; touching the others would
        # create CUDA contexts on every GPU)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    import random

    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype("uint32"), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def is_training_state(ckpt) -> bool:
    """A checkpoint a run can resume from (not weights only, not a release)."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("step"), int) and "optimizer" in ckpt


def newest_checkpoint(folder: str | os.PathLike) -> str | None:
    """The training state in a run folder with the highest step (`last.pth` on a tie), or None.
    By step, not file time: a copied or touched file does not win. Weights-only files and
    releases are not training states and are passed over."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    found = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".pth") or name.startswith(".tmp-"):
            continue
        path = os.path.join(folder, name)
        try:  # mmap: reads the small "step" entry, not the tensors
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                                  f"{e}); move it out of the run folder") from None
        if is_training_state(state):
            found.append((state["step"], name == "last.pth", path))
    return max(found)[2] if found else None


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete temporary files that a killed `save_checkpoint` left behind."""
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            if f.startswith(".tmp-") and f.endswith(".pth"):
                os.unlink(os.path.join(folder, f))


def check_compatible(ckpt: dict, cfg: dict, tokenizer_sha256: str | None, source: str,
                     tokenizer_path: str | None = None) -> None:
    """Refuse a checkpoint whose architecture or tokenizer differs from `cfg`'s, naming the keys
    (and both tokenizer files, given `tokenizer_path`, the one this run would use)."""
    saved = ckpt.get("config")
    if isinstance(saved, dict):
        diff = [f"{k}: checkpoint {saved[k]!r} vs config {cfg[k]!r}" for k in ARCH_KEYS
                if k in saved and k in cfg and _plain(saved[k]) != _plain(cfg[k])]
        if diff:
            raise CheckpointError(f"{source} was trained with another architecture ("
                                  f"{'; '.join(diff)}); use the config it was trained with")
    saved_tok = ckpt.get("tokenizer_sha256")
    if saved_tok and tokenizer_sha256 and saved_tok != tokenizer_sha256:
        theirs = ckpt.get("tokenizer") or "the tokenizer.json released beside it"
        ours = f" {tokenizer_path}" if tokenizer_path else ""
        raise CheckpointError(f"{source} was trained with another tokenizer ({theirs}) than this "
                              f"run's{ours} (the contents differ): token ids would not mean the "
                              f"same symbols; use the checkpoint's tokenizer")


def _plain(value: Any) -> Any:
    """Compare YAML-ish values without caring for list/tuple or Munch/dict differences."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
