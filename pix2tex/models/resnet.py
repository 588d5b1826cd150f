"""ResNet-18 encoder of the distillation seed (after kingyiusuen/image-to-latex).

timm's ResNet-18 cut after its third stage (feature stride 16, 256 channels), a 1x1 projection to
the model width, and a fixed 2-D sinusoidal position code computed for the feature map actually
produced (half of the channels encode the row, half the column), so any image size works and
nothing size-dependent is stored. `resnet_layers` and `resnet_channels` set the blocks and
channels of the three stages: a student's encoder is the same network, narrower or shallower.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from timm.models.resnet import BasicBlock, ResNet


def sinusoid_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h*w, dim] position code: sin/cos of the row in the first dim/2 channels, of the column in
    the rest (the transformer paper's frequencies, 10000^(-2i/(dim/2)))."""
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4 for the 2-D sinusoidal position code")
    quarter = dim // 4
    freq = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / quarter))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freq  # [h, dim/4]
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freq  # [w, dim/4]
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, dim // 2)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([row_code, col_code], dim=2).reshape(h * w, dim).to(dtype)


class ResNetEncoder(nn.Module):
    """images [B, C, H, W] -> memory [B, (H/16)(W/16), dim]."""

    def __init__(self, dim: int, in_chans: int = 1, dropout: float = 0.0,
                 layers=(2, 2, 2), channels=(64, 128, 256)):
        super().__init__()
        # a ResNet cut after stage 3 (feature tap 3 = layer3: stride 16); timm builds a 4th stage,
        # pruned at once
        self.backbone = ResNet(BasicBlock, [*layers, 2], in_chans=in_chans, num_classes=0,
                               global_pool='', channels=(*channels, 2 * channels[-1]),
                               stem_width=channels[0])
        self.backbone.prune_intermediate_layers(indices=[3])
        self.proj = nn.Conv2d(self.backbone.feature_info[3]["num_chs"], dim, kernel_size=1)
        self.drop = nn.Dropout(dropout)
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone.forward_features(images))  # [B, dim, h, w]
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, dim]
        return self.drop(x + sinusoid_2d(h, w, D, device=x.device, dtype=x.dtype))


def get_encoder(cfg) -> ResNetEncoder:
    return ResNetEncoder(cfg.dim, in_chans=cfg.channels, dropout=cfg.get("emb_dropout", 0.0),
                         layers=tuple(cfg.resnet_layers), channels=tuple(cfg.resnet_channels))
