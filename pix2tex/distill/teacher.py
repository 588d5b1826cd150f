"""The frozen teacher: loaded from its checkpoint (`load_teacher`), identified by its weights
(`model_digest`). Both the distillation run (pix2tex.distill.main) and the pseudo-label maker
(pix2tex.distill.pseudo_labels) use it; neither imports the other for it.
"""
from __future__ import annotations

import hashlib
import os

import torch

from pix2tex.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model_weights
from pix2tex.config import ConfigError, load_config, to_dict


def load_teacher(ckpt_path: str | None, config_path: str | None = None, device="cpu"):
    """The frozen teacher: (model in eval mode without gradients, its config, its checkpoint dict).
    Its config is `config_path`, else the one stored in the checkpoint."""
    if not ckpt_path:
        raise ConfigError("distill.teacher_ckpt is not set: give the teacher's checkpoint "
                          "(e.g. distill.teacher_ckpt=checkpoints/distill-teacher/best.pth)")
    from pix2tex.models import get_model
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"teacher checkpoint not found: {ckpt_path} (distill.teacher_ckpt); "
                              f"train the teacher first, e.g. `python train.py --config "
                              f"settings/distill/teacher.yaml`")
    ckpt = load_checkpoint(ckpt_path)
    if config_path:
        tcfg = load_config(config_path)
    elif isinstance(ckpt.get("config"), dict):
        tcfg = load_config(None, base=ckpt["config"])
    else:
        raise ConfigError(f"{ckpt_path} holds no config (a bare weights file): set "
                          f"distill.teacher_config to the config it was trained with")
    check_compatible(ckpt, to_dict(tcfg), None, ckpt_path)
    teacher = get_model(tcfg)
    load_model_weights(teacher, ckpt, ckpt_path)
    teacher.to(device).eval().requires_grad_(False)
    return teacher, tcfg, ckpt


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, shapes and bytes): which teacher made a label set."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        # reshape first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
