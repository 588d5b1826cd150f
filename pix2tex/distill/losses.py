"""Knowledge-distillation losses. Every loss is masked: padding positions never count.

Shapes: logits `[B, T, V]`, hidden states `[B, T, D]` (decoder) or `[B, N, D]` (encoder memory),
`mask` `[B, T]` bool, True where the target position is a real token (EOS included).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values [B, T]` over positions where `mask` is True (0 when nothing is masked in)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def target_loss(student_logits: torch.Tensor, targets: torch.Tensor, pad_token: int = 0) -> torch.Tensor:
    """Cross-entropy of the student on the labels (ground truth or teacher pseudo-labels)."""
    return F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=pad_token)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
              temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at temperature T, times T² so that its
    gradients keep the same scale as the hard loss when T changes."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [B, T]
    return masked_mean(kl, mask) * t * t


def hard_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's argmax tokens."""
    teacher_tokens = teacher_logits.argmax(-1)
    ce = F.cross_entropy(student_logits.flatten(0, 1).float(), teacher_tokens.flatten(), reduction="none")
    return masked_mean(ce.view_as(teacher_tokens), mask)


def match_grid(memory: torch.Tensor, length: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """Resample encoder memory `[B, N, D]` laid out on an image-shaped grid to `length` positions
    of the other model's grid, so encoders with different strides can be compared."""
    b, n, d = memory.shape
    if n == length:
        return memory
    height, width = image_hw

    def grid(count):  # the (rows, cols) grid of `count` cells on an image of this aspect ratio
        stride = math.sqrt(height * width / count)
        rows = max(1, round(height / stride))
        return rows, count // rows

    rows, cols = grid(n)
    to_rows, to_cols = grid(length)
    if rows * cols != n or to_rows * to_cols != length:
        raise ValueError(f"cannot lay encoder outputs of {n} and {length} positions on grids of a "
                         f"{height}x{width} image; give teacher and student the same patch stride")
    feat = memory.transpose(1, 2).reshape(b, d, rows, cols)
    feat = F.interpolate(feat, size=(to_rows, to_cols), mode="bilinear", align_corners=False)
    return feat.flatten(2).transpose(1, 2)


class EmbeddingLoss(nn.Module):
    """Distance between student and teacher hidden states, through a learned linear projection
    of the student's states when the widths differ (identity when they match)."""

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse"):
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"distill.embedding_loss must be mse or cosine, got {kind!r}")
        self.kind = kind
        self.project = nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        student = self.project(student).float()
        teacher = teacher.float()
        if self.kind == "mse":
            per_position = (student - teacher).pow(2).mean(-1)
        else:
            per_position = 1 - F.cosine_similarity(student, teacher, dim=-1)
        if mask is None:
            return per_position.mean()
        return masked_mean(per_position, mask)
