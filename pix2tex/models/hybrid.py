"""Hybrid encoder (LaTeX-OCR's): timm ResNetV2 feature map -> ViT blocks.

The ResNetV2 (no pre-activation, 'same'-padded weight-standardized convs, one input channel, no
pooling or classifier; GroupNorm with a fast channels-last CPU path, fused_norm.py) reduces the
image by 2^(stages+1) (16 for three stages). timm's HybridEmbed
projects that feature map to `dim` with a conv of kernel = stride = patch_size / reduction, and
GridViT's transformer blocks run over the resulting grid with (row, column)-indexed positions.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed, StdConv2dSame
from timm.layers.padding import get_same_padding, pad_same
from timm.layers.pool2d_same import MaxPool2dSame
from timm.models.resnetv2 import ResNetV2

from . import fused_norm
from .fused_norm import GroupNormAct, route_backbone
from .vit import GridViT


def backbone_reduction(backbone_layers) -> int:
    """Feature stride of the ResNetV2: the stem reduces by 4, every stage after the first by 2."""
    return 2 ** (len(backbone_layers) + 1)


def norm_layer(num_channels: int, **kwargs) -> GroupNormAct:
    """ResNetV2's norm layer (32 groups). A plain function: timm passes those through unchanged."""
    return GroupNormAct(num_channels, num_groups=32, **kwargs)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """`t` with channels-last strides. With one channel both layouts are the same memory and
    PyTorch calls it NCHW, so mkldnn would convert the convolution's output back to NCHW (a copy
    forward and one backward of the largest activation); the explicit strides avoid that."""
    if t.shape[1] == 1:
        _, _, h, w = t.shape
        return t.contiguous().as_strided(t.shape, (h * w, 1, w, 1))
    return t.contiguous(memory_format=torch.channels_last)


def standardized_weight(conv) -> torch.Tensor:
    """timm's weight standardization (each filter to zero mean and unit biased variance, eps
    added) as a layer norm over each filter: the function timm computes with batch_norm, and
    PyTorch's CPU layer norm is faster (forward + backward over this backbone's 9.3M conv weights,
    once per training step: 28 -> 18 ms)."""
    w = conv.weight
    return F.layer_norm(w.reshape(w.shape[0], -1), (w[0].numel(),), eps=conv.eps).reshape_as(w)


class StdConv(StdConv2dSame):
    """timm's weight-standardized 'same' conv (same parameters and state dict), standardizing
    with `standardized_weight`."""

    def forward(self, x):
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self.conv(x, standardized_weight(self))

    def conv(self, x, weight):
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StemConv(StdConv):
    """The stem's conv; on the channels-last CPU path (fused_norm) its one-channel input and its
    weights are handed to mkldnn as channels-last."""

    def conv(self, x, weight):
        if fused_norm.available() and x.device.type == "cpu" and not fused_norm.tracing():
            x, weight = channels_last(x), channels_last(weight)
        return super().conv(x, weight)


class MaxPoolSame(MaxPool2dSame):
    """timm's 'same' max pool without materializing the -inf padding: max_pool2d's own padding
    plus ceil_mode picks the same windows (checked by output size; otherwise timm's way)."""

    def forward(self, x):
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        h, w = x.shape[-2:]
        ph, pw = get_same_padding(h, kh, sh, 1), get_same_padding(w, kw, sw, 1)
        pad = (ph // 2, pw // 2)
        if (self.dilation != (1, 1) or pad[0] * 2 > kh or pad[1] * 2 > kw
                or (h + 2 * pad[0] - kh + sh - 1) // sh + 1 != math.ceil(h / sh)
                or (w + 2 * pad[1] - kw + sw - 1) // sw + 1 != math.ceil(w / sw)):
            return super().forward(x)
        return F.max_pool2d(x, self.kernel_size, self.stride, pad, 1, ceil_mode=True)


def route_stem(stem: torch.nn.Module) -> None:
    """Replace the stem's conv by a `StemConv` holding its weights (channels-last on CPU) and its
    'same' max pool by a `MaxPoolSame` (no state)."""
    old = stem.conv
    if old.kernel_size[0] == old.kernel_size[1] and old.stride[0] == old.stride[1] and \
            old.dilation == (1, 1) and old.groups == 1:
        with torch.random.fork_rng(devices=[]):  # its throwaway init leaves the seeded init alone
            conv = StemConv(old.in_channels, old.out_channels, old.kernel_size[0], old.stride[0],
                            bias=old.bias is not None, eps=old.eps)
        conv.load_state_dict(old.state_dict())
        stem.conv = conv
    pool = getattr(stem, "pool", None)
    if type(pool) is MaxPool2dSame:
        stem.pool = MaxPoolSame(pool.kernel_size, pool.stride, dilation=pool.dilation,
                                ceil_mode=pool.ceil_mode)


def get_encoder(cfg) -> GridViT:
    reduction = backbone_reduction(cfg.backbone_layers)
    if cfg.patch_size % reduction:
        raise ValueError(f"patch_size={cfg.patch_size} must be a multiple of {reduction}, the "
                         f"feature stride of backbone_layers={list(cfg.backbone_layers)}")
    backbone = ResNetV2(layers=list(cfg.backbone_layers), num_classes=0, global_pool='',
                        in_chans=cfg.channels, preact=False, stem_type='same',
                        conv_layer=StdConv, norm_layer=norm_layer)
    route_backbone(backbone)  # each block's last norm + shortcut + ReLU in one kernel (bf16 CPU)
    route_stem(backbone.stem)
    embed = partial(HybridEmbed, backbone=backbone)
    return GridViT(max_height=cfg.max_height, max_width=cfg.max_width,
                   patch_size=cfg.patch_size // reduction, embed_dim=cfg.dim,
                   depth=cfg.encoder_depth, num_heads=cfg.encoder_heads or cfg.heads,
                   in_chans=cfg.channels, embed_layer=embed,
                   pos_drop_rate=cfg.get("emb_dropout", 0.0))
