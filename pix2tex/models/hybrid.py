"""Hybrid encoder (LaTeX-OCR's): timm ResNetV2 feature map -> ViT blocks.

The ResNetV2 (no pre-activation, 'same'-padded weight-standardized convs, one input channel, no
pooling or classifier; GroupNorm with a fast channels-last CPU path, fused_norm.py) reduces the
image by 2^(stages+1) (16 for three stages). timm's HybridEmbed
projects that feature map to `dim` with a conv of kernel = stride = patch_size / reduction, and
GridViT's transformer blocks run over the resulting grid with (row, column)-indexed positions.
"""
from __future__ import annotations

from functools import partial

from timm.layers import HybridEmbed, StdConv2dSame
from timm.models.resnetv2 import ResNetV2

from .fused_norm import GroupNormAct
from .vit import GridViT


def backbone_reduction(backbone_layers) -> int:
    """Feature stride of the ResNetV2: the stem reduces by 4, every stage after the first by 2."""
    return 2 ** (len(backbone_layers) + 1)


def group_norm_act(num_channels: int, **kwargs) -> GroupNormAct:
    """ResNetV2's norm layer (32 groups). A plain function: timm passes those through unchanged."""
    return GroupNormAct(num_channels, num_groups=32, **kwargs)


def get_encoder(cfg) -> GridViT:
    reduction = backbone_reduction(cfg.backbone_layers)
    if cfg.patch_size % reduction:
        raise ValueError(f"patch_size={cfg.patch_size} must be a multiple of {reduction}, the "
                         f"feature stride of backbone_layers={list(cfg.backbone_layers)}")
    backbone = ResNetV2(layers=list(cfg.backbone_layers), num_classes=0, global_pool='',
                        in_chans=cfg.channels, preact=False, stem_type='same',
                        conv_layer=StdConv2dSame, norm_layer=group_norm_act)
    embed = partial(HybridEmbed, backbone=backbone)
    return GridViT(max_height=cfg.max_height, max_width=cfg.max_width,
                   patch_size=cfg.patch_size // reduction, embed_dim=cfg.dim,
                   depth=cfg.encoder_depth, num_heads=cfg.encoder_heads or cfg.heads,
                   in_chans=cfg.channels, embed_layer=embed,
                   pos_drop_rate=cfg.get("emb_dropout", 0.0))
