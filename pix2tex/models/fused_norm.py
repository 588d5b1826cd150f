"""GroupNorm (+residual, +ReLU) as one C++ kernel for channels-last bfloat16 CPU tensors.

Why: on CPU, mkldnn runs bf16 convolutions several times faster on channels-last tensors than on
NCHW ones (it converts NCHW input and output on every call), but PyTorch's own channels-last
GroupNorm is 2-4x slower than its NCHW one. With this kernel the ResNetV2 backbone runs
channels-last end to end: `GroupNormAct` below converts its input to channels-last once (at the
stem) and everything after it stays that way; `Bottleneck` also folds the shortcut addition and
the ReLU that end each block into the kernel.

The kernel (csrc/group_norm_nhwc.cpp) is compiled on first `load()` with torch.utils.cpp_extension
(about 30 s, cached under ~/.cache/torch_extensions) and needs a C++ compiler with OpenMP. Training
on CPU in bf16 calls `load()`; where it cannot build, or with PIX2TEX_FUSED_NORM=0, the model keeps
PyTorch's GroupNorm in NCHW and gives the same results, about 1.3x slower per step. Weights and
state dicts are those of timm's GroupNormAct, so checkpoints do not depend on it.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from timm.layers import GroupNormAct as TimmGroupNormAct
from timm.models.resnetv2 import Bottleneck as TimmBottleneck
from torch import nn

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "group_norm_nhwc.cpp")
_kernel = None
_error: str | None = None


def load() -> bool:
    """Build (once per machine) and load the kernel. Returns whether it is in use; never raises."""
    global _kernel, _error
    if _kernel is not None or _error is not None:
        return _kernel is not None
    if os.environ.get("PIX2TEX_FUSED_NORM", "1") == "0":
        _error = "disabled by PIX2TEX_FUSED_NORM=0"
        return False
    try:
        from torch.utils import cpp_extension

        # ninja from pip sits next to the interpreter, which need not be on PATH (.venv/bin/python)
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        # -march=native: the build cache is per machine; the name carries the CPU's flags so a
        # home directory shared with another CPU type builds its own copy. -fopenmp compiles
        # at::parallel_for's OpenMP loop; it is not linked: torch has already loaded its libgomp.
        _kernel = cpp_extension.load(
            name=f"pix2tex_group_norm_nhwc_{_cpu_tag()}", sources=[SOURCE],
            extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: fall back, say why
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        warnings.warn(f"pix2tex: the channels-last GroupNorm kernel could not be built ({_error}); "
                      "using PyTorch's GroupNorm (slower bf16 training on CPU)", RuntimeWarning)
    return _kernel is not None


def available() -> bool:
    return _kernel is not None


def _cpu_tag() -> str:
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((l for l in f if l.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


class GroupNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, groups: int, eps: float, relu: bool):
        y, mean, rstd = _kernel.forward(x, weight, bias, residual, groups, eps, relu)
        ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
        ctx.groups, ctx.relu = groups, relu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias, dresidual = _kernel.backward(dy, x, weight, bias, residual, mean, rstd,
                                                         ctx.groups, ctx.relu)
        return dx, dweight, dbias, dresidual, None, None, None


def group_norm_act(x, groups: int, weight, bias, eps: float, relu: bool, residual=None):
    """act(group_norm(x) + residual) by the kernel, for 4-D bf16 CPU tensors (made channels-last)
    and float32 affine parameters."""
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    return GroupNormActFunction.apply(x, weight.float(), bias.float(), residual, groups, eps, relu)


class GroupNormAct(TimmGroupNormAct):
    """timm's GroupNormAct (same parameters and state dict) that uses the kernel when it can."""

    def kernel_applies(self, x) -> bool:
        return (_kernel is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16
                and x.dim() == 4 and self.affine and isinstance(self.drop, nn.Identity)
                and isinstance(self.act, (nn.ReLU, nn.Identity)) and not tracing())

    def forward(self, x):
        if self.kernel_applies(x):
            relu = isinstance(self.act, nn.ReLU)
            return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, relu)
        return super().forward(x)


class Bottleneck(nn.Module):
    """timm's ResNetV2 bottleneck (no pre-activation): the same child modules under the same names
    (so the same state dict), and a forward where, with the kernel, the last norm, the shortcut
    addition and the ReLU after it are one pass (three in PyTorch, and three more backward)."""

    def __init__(self, block: TimmBottleneck):
        super().__init__()
        self.downsample = block.downsample  # a module, or None (then not a child)
        for name, child in block.named_children():
            self.add_module(name, child)  # conv1..3, norm1..3, drop_path, act3 (and downsample)

    def zero_init_last(self) -> None:
        """timm's: the last norm's weight to zero. The encoder's init calls it after the blocks
        are built (so a module without it would start from other weights)."""
        if getattr(self.norm3, "weight", None) is not None:
            nn.init.zeros_(self.norm3.weight)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv3(self.norm2(self.conv2(self.norm1(self.conv1(x)))))
        norm = self.norm3
        if (isinstance(norm, GroupNormAct) and norm.kernel_applies(x) and isinstance(norm.act, nn.Identity)
                and isinstance(self.drop_path, nn.Identity) and isinstance(self.act3, nn.ReLU)
                and shortcut.dtype == x.dtype and shortcut.shape == x.shape):
            return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, relu=True,
                                  residual=shortcut)
        return self.act3(self.drop_path(norm(x)) + shortcut)


def route_backbone(backbone: nn.Module) -> None:
    """Replace timm's bottlenecks inside `backbone` by the `Bottleneck` above, holding their
    modules (same state dict)."""
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is TimmBottleneck:
                setattr(parent, name, Bottleneck(child))


def tracing() -> bool:
    """Under torch.jit / ONNX export / torch.compile: PyTorch's own ops, not the kernel."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling())
