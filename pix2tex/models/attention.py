"""Scaled dot-product attention for training on CPU in bf16, with the faster of two exact kernels.

PyTorch's CPU flash-attention kernel is slow in bf16, above all its backward. Measured on 2 threads
(forward + backward, batch 16, 8 heads; ../bench/train.py covers the whole step):

    shape (queries x keys, head dim)      flash bf16   flash fp32   matmuls (below)
    ViT 193 x 193, 32                       35 ms        21 ms        19 ms
    ViT 281 x 281, 32                       51 ms        40 ms        38 ms
    ViT 385 x 385, 32                       77 ms        63 ms        75 ms
    decoder self-attention 59 x 59, 64      16 ms         6 ms         3 ms (causal)
    decoder cross-attention 59 x 193, 64    22 ms        18 ms        10 ms
    decoder cross-attention 59 x 385, 64    29 ms        33 ms        19 ms

So: short attention (queries x keys up to SHORT) runs as explicit bf16 matmuls with the softmax in
float32 and an explicit backward; longer attention runs the flash kernel in float32. Anything
else (GPU, float32, inference, dropout, masks) goes to F.scaled_dot_product_attention unchanged.
`Attention` (timm's, for the ViT encoder) and `RoutedAttend` (around x-transformers' Attend, for the
decoder) route their attention through `attention()`; parameters and state dicts are unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention as TimmAttention
from x_transformers.attend import Attend as XAttend
from x_transformers.attend import Intermediates

SHORT = 256 * 256  # queries x keys up to which the matmul kernel wins or ties (table above);
# above it the probabilities it keeps for the backward grow large


class MatmulAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v: bf16 matmuls, float32 softmax. q, k, v are made contiguous once
    (the callers' are strided head views, which every batched matmul would otherwise copy again),
    and the probabilities are kept for the backward: short attention, so they are small."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        p = _probabilities(q, k, causal)
        p_low = p.to(v.dtype)
        out = torch.matmul(p_low, v)
        ctx.save_for_backward(q, k, v, p, p_low)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, p_low = ctx.saved_tensors
        dv = torch.matmul(p_low.transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2))
        # PyTorch's fused softmax backward P * (dP - rowsum(P * dP)) in float32, then the 1/sqrt(d)
        # of the scores
        ds = torch.ops.aten._softmax_backward_data(dp.float(), p, -1, torch.float32)
        ds = ds.mul_(1 / math.sqrt(q.shape[-1])).to(q.dtype)
        dq = torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-1, -2), q)
        return dq, dk, dv, None


def _probabilities(q, k, causal: bool) -> torch.Tensor:
    """Float32 softmax of the scores; the matmul scales them before rounding to bf16, and the
    softmax reads bf16 and computes in float32 (no float32 copy of the scores)."""
    B, H, L, d = q.shape
    S = k.shape[-2]
    s = torch.baddbmm(q.new_empty(B * H, L, S), q.view(B * H, L, d),
                      k.view(B * H, S, d).transpose(1, 2), beta=0, alpha=1 / math.sqrt(d))
    s = s.view(B, H, L, S)
    if causal:
        s.masked_fill_(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32)


def kernel_for(q, k, is_causal: bool = False, dropout_p: float = 0.0) -> str:
    """'matmul', 'flash32' or 'sdpa' (PyTorch's, unchanged) for these queries and keys."""
    if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or dropout_p > 0
            or not torch.is_grad_enabled() or (is_causal and q.shape[-2] != k.shape[-2])):
        return "sdpa"
    return "matmul" if q.shape[-2] * k.shape[-2] <= SHORT else "flash32"


def attention(q, k, v, is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, H, L, d], k/v [B, H, S, d] -> [B, H, L, d], as F.scaled_dot_product_attention."""
    kernel = kernel_for(q, k, is_causal, dropout_p)
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
    if kernel == "matmul":
        return MatmulAttention.apply(q, k, v, is_causal)
    with torch.autocast("cpu", enabled=False):  # autocast would cast the float32 inputs back
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal)
    return out.to(q.dtype)


class Attention(TimmAttention):
    """timm's ViT attention through `attention()` (no gate, mask or causal; else timm's own)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal or self.gate is not None or not self.fused_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if (kernel_for(q, k, dropout_p=dropout_p) == "flash32"
                and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            # one contiguous float32 cast of q, k and v together (three strided ones cost 3x), and
            # the float32 output goes on to the projection, which autocast casts anyway
            with torch.autocast("cpu", enabled=False):
                q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
                x = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            x = attention(q, k, v, dropout_p=dropout_p)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class RoutedAttend(nn.Module):
    """An x-transformers `Attend` (kept as `inner`) whose flash path runs through `attention()`
    when nothing but (optional) causality is asked for; masks, biases, grouped heads and the other
    options go to the inner Attend unchanged."""

    def __init__(self, inner: XAttend):
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, mask=None, attn_bias=None, prev_attn=None, attn_delta=None,
                row_mask=None, flash_pack_seq_kwargs=None, causal=None):
        a = self.inner
        causal = a.causal if causal is None else causal
        causal = causal and q.shape[-2] > 1  # one query: KV-cached decoding, as Attend does
        default_scale = a.scale is None or math.isclose(a.scale, q.shape[-1] ** -0.5)
        plain = (a.flash and mask is None and attn_bias is None and prev_attn is None
                 and attn_delta is None and not a.add_zero_kv and not a.l2_distance
                 and default_scale and not a.flash_pack_seq and k.ndim == 4 and v.ndim == 4
                 and k.shape[1] == q.shape[1] and not (causal and q.shape[-2] != k.shape[-2]))
        if not plain:
            return a(q, k, v, mask=mask, attn_bias=attn_bias, prev_attn=prev_attn,
                     attn_delta=attn_delta, row_mask=row_mask,
                     flash_pack_seq_kwargs=flash_pack_seq_kwargs, causal=causal)
        out = attention(q, k, v, is_causal=causal, dropout_p=a.dropout if a.training else 0.0)
        return out, Intermediates()


def route_decoder_attention(module: torch.nn.Module) -> None:
    """Wrap every x-transformers Attend inside `module` in a `RoutedAttend`, so the decoder's
    attention runs through `attention()`. Only an Attend without state is wrapped (the ones this
    project's decoders have): the wrapper must not rename anything in the state dict."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is XAttend and not child.state_dict():
                setattr(parent, name, RoutedAttend(child))
