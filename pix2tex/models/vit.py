"""ViT encoder over a grid of patches of any size up to max_height x max_width.

`GridViT` is timm's VisionTransformer with one change: its learned position table covers the
largest grid (max_height/patch x max_width/patch) and a smaller image takes the rows and columns
it covers, so the patch in row r, column c gets the same position vector at every image size
(LaTeX-OCR's indexing; timm's own `dynamic_img_size` would resample the table instead, and a
patch's position would then depend on the image size). The class token keeps entry 0. Attention
is timm's, with faster kernels for bf16 training on CPU (attention.py).

`get_encoder(cfg)` builds the plain ViT (linear patch embedding); `hybrid.py` builds the same
transformer over a ResNetV2 feature map.
"""
from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from .attention import Attention


class GridViT(VisionTransformer):
    """timm ViT with a 2-D position table indexed by (row, column); returns all tokens, normed."""

    def __init__(self, max_height: int, max_width: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, in_chans: int = 1, embed_layer=PatchEmbed, **kwargs):
        # dynamic_img_size: the patch embedding keeps its [B, h, w, C] grid for _pos_embed and
        # accepts any image size (not only max_height x max_width).
        super().__init__(img_size=(max_height, max_width), patch_size=patch_size, in_chans=in_chans,
                         num_classes=0, global_pool='', embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, dynamic_img_size=True, embed_layer=embed_layer,
                         attn_layer=Attention, **kwargs)
        self.max_height, self.max_width = max_height, max_width
        self.grid_h, self.grid_w = self.patch_embed.grid_size

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        if h > self.grid_h or w > self.grid_w:
            raise ValueError(f"image grid {h}x{w} patches exceeds the position table "
                             f"{self.grid_h}x{self.grid_w} (max_height={self.max_height}, "
                             f"max_width={self.max_width}); resize or pad the image smaller")
        rows = torch.arange(h, device=x.device) * self.grid_w
        cols = torch.arange(w, device=x.device)
        idx = (rows[:, None] + cols[None, :]).flatten() + self.num_prefix_tokens
        x = x.reshape(B, h * w, C) + self.pos_embed[:, idx]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> memory [B, 1 + (H/p)(W/p), dim] (class token first)."""
        return self.forward_features(images)


def get_encoder(cfg) -> GridViT:
    return GridViT(max_height=cfg.max_height, max_width=cfg.max_width, patch_size=cfg.patch_size,
                   embed_dim=cfg.dim, depth=cfg.encoder_depth,
                   num_heads=cfg.encoder_heads or cfg.heads, in_chans=cfg.channels,
                   pos_drop_rate=cfg.get("emb_dropout", 0.0))
