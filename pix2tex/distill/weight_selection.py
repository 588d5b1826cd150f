"""Start a student from its teacher's weights: weight selection (Xu et al., 2024, "Initializing
Models with Larger Ones").

Every student tensor whose name the teacher also has takes the teacher's elements at the first
n indices of each dimension (n: the student's size there), so one index set is used for each
width throughout the network: the channels a convolution keeps are the channels the next one
reads, the residual stream and the attention heads stay aligned, and the student's one decoder
layer is the teacher's first. Two x-transformers outputs are two halves (a gated linear unit:
value, then gate) and are selected half by half: the attention output projection with
attn_on_attn and the gated feed-forward's input projection. BatchNorm statistics are selected
like its weights, so a kept channel is normalized as in the teacher. A 1x1 shortcut projection
the teacher lacks (timm adds one when a narrower first stage follows the stem, where the
teacher's shortcut is the identity) starts as the identity on the kept channels, also where the
teacher has no such encoder at all. What else the student has and
the teacher lacks (another name, or a size larger than the teacher's) keeps its random start.
"""
from __future__ import annotations

import torch
from torch import nn

# parameters whose first dimension is two halves (value, gate) that a GLU splits
GATED_OUTPUTS = (".to_out.0.weight", ".to_out.0.bias", ".ff.0.proj.weight", ".ff.0.proj.bias")


def _select(teacher: torch.Tensor, shape: torch.Size, gated: bool) -> torch.Tensor:
    """The teacher tensor's first shape[d] elements along every dimension d (a gated first
    dimension: the first shape[0] / 2 of each half)."""
    if gated:
        half = shape[0] // 2
        value, gate = teacher.chunk(2, dim=0)
        rest = shape[1:]
        return torch.cat([_select(value, (half, *rest), False), _select(gate, (half, *rest), False)])
    return teacher[tuple(slice(0, n) for n in shape)]


def select_weights(student: nn.Module, teacher: nn.Module) -> dict:
    """Copy the teacher's selected weights into `student` in place (see the module docstring).
    Returns counts: tensors `selected` (sizes differ), `copied` (same sizes), `identity` (shortcut
    projections), `kept` (the student's own start: no such tensor in the teacher, or a larger one)."""
    teacher_state = teacher.state_dict()
    counts = {"selected": 0, "copied": 0, "identity": 0, "kept": 0}
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = teacher_state.get(name)
            if source is None and name.endswith(".downsample.0.weight") and \
                    tensor.shape[2:] == (1, 1) and tensor.shape[0] <= tensor.shape[1]:
                tensor.copy_(torch.eye(*tensor.shape[:2])[:, :, None, None])
                counts["identity"] += 1
                continue
            if source is None or source.dim() != tensor.dim() or \
                    any(s > t for s, t in zip(tensor.shape, source.shape)):
                counts["kept"] += 1
                continue
            gated = name.endswith(GATED_OUTPUTS) and source.shape[0] != tensor.shape[0]
            tensor.copy_(_select(source, tensor.shape, gated))
            counts["copied" if source.shape == tensor.shape else "selected"] += 1
    return counts
