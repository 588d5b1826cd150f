"""Transformer decoder: x-transformers modules for training, a lean KV-cached step for generation.

`LatexDecoder.net` is an x-transformers `TransformerWrapper` over a `Decoder` with cross-attention
(configured by `decoder_args`, as in LaTeX-OCR). Training and teacher forcing run through it.

Generation runs one token at a time. x-transformers has its own cached path (`cache=`), but on a
CPU its per-step Python work costs more than the arithmetic at batch 1, so `decode_step` re-reads
the same weights in a short sequence of tensor ops (pre-norm blocks: self-attention,
cross-attention, feed-forward) with the cache as explicit tensors:

    decode_step(tokens [B], pos, cross_k, cross_v, self_k, self_v) -> (logits [B, V], k_new, v_new)

`cross_k/cross_v` [Lc, B, H, N, d] are the cross-attention keys/values of the encoder memory,
computed once per image (`cross_kv`). Images of different sizes share a batch with their memories
padded to the longest: `cross_mask` [B, 1, 1, N] (0 where a row's memory is, -inf on its padding)
keeps each row's attention on its own image. `self_k/self_v` [La, B, H, T, d] hold the self-attention
keys/values of earlier positions: either buffers the step writes position `pos` into (generation,
no copying) or exactly the past (then the step appends, for a functional graph such as an ONNX
export). The lean step covers the decoder options in LEAN_DECODER_ARGS; any other `decoder_args`
fall back to x-transformers' own cached path (`XTransformersState`). Tests check both against the
uncached forward.

With `bias=True` (config `decoder_bias`) the decoder has what LaTeX-OCR's (x-transformers 0.15)
had and x-transformers 2.x dropped: a bias in every layer norm, in each attention's output
projection and in the logits; LaTeX-OCR weights files load into it (checkpoint.py).

`LatexDecoder` is a `CustomARWrapper`: LaTeX-OCR's name for its decoder, an x-transformers
`AutoregressiveWrapper` whose `generate(start_tokens, seq_len, eos_token, temperature,
filter_logits_fn, filter_thres, context=memory)` LaTeX-OCR code calls (`model.decoder.generate`).
Here that call runs the KV-cached step and the one sampler of `generate.py`.

A step at small batch reads every decoder weight once and does little arithmetic with it, so its
floor is the weight bytes over the memory bandwidth. `_weights(precision)` lays the weights out in
fp32, bf16 (weights, matmul inputs and caches; the residual stream stays float32), or int8
(dynamic quantization: per-channel int8 weights, float32 activations; caches and attention in
`cache_dtype`, bf16 where that is fast).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from x_transformers import Decoder, TransformerWrapper
from x_transformers.autoregressive_wrapper import AutoregressiveWrapper, top_k, top_p
from x_transformers.x_transformers import AbsolutePositionalEmbedding, Attention, FeedForward
from x_transformers.x_transformers import LayerNorm as XLayerNorm

from .attention import route_decoder_attention
from .generate import sample

# decoder_args the lean step implements: key -> allowed values (None: any value). Dropout keys do
# nothing at inference.
LEAN_DECODER_ARGS = {
    "cross_attend": (True,), "attn_on_attn": None, "ff_glu": None, "ff_swish": None,
    "ff_mult": None, "attn_dim_head": None, "attn_flash": None, "rel_pos_bias": (False,),
    "use_scalenorm": (False,), "use_rmsnorm": (False,), "rotary_pos_emb": (False,),
    "attn_dropout": None, "ff_dropout": None, "layer_dropout": None,
    "cross_attn_tokens_dropout": None,
}


def _is_identity(module) -> bool:
    return type(module).__name__ == "Identity"  # torch's or torch_einops_utils' (x-transformers)


def weights_key(tensors) -> tuple:
    """Changes whenever any of `tensors` is updated, for caches derived from weights. Address and
    version counter, plus the per-tensor norms (one foreach call): fused optimizers update weights
    in place without bumping `_version`."""
    tensors = [t.detach() for t in tensors]
    floats = [t for t in tensors if t.is_floating_point()]
    norms = torch.stack(torch._foreach_norm(floats)).tolist() if floats else []
    return tuple((t.data_ptr(), t._version, t.device) for t in tensors) + tuple(norms)


def quantize_int8(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Per-output-channel symmetric int8 weight, packed for torch's dynamic quantized linear."""
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch 2.15 marks quantized tensors deprecated; they work
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(weight.float(), scale, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())


def _linear(x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return torch.ops.quantized.linear_dynamic(x, weight, False)  # int8 packed (bias inside)


class BiasedLayerNorm(XLayerNorm):
    """x-transformers' LayerNorm with a bias `beta`, as x-transformers 0.15's (nn.LayerNorm) had."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return super().forward(x) + self.beta


def _with_bias(linear: nn.Linear) -> nn.Linear:
    """`linear`'s weight in a Linear with a bias (zero: the same function until trained)."""
    out = nn.Linear(linear.in_features, linear.out_features, bias=True)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        out.bias.zero_()
    return out


def add_biases(net: TransformerWrapper) -> None:
    """Give the x-transformers decoder `net` the biases LaTeX-OCR's decoder has: in every pre-norm
    and the final norm, in each attention's output projection and in the logits."""
    layers = net.attn_layers
    with torch.random.fork_rng(devices=[]):  # the new modules' throwaway init draws nothing seeded
        for norms, block, _ in layers.layers:
            norms[0] = BiasedLayerNorm(layers.dim)
            if isinstance(block, Attention):
                if isinstance(block.to_out, nn.Sequential):  # attn_on_attn: Linear, GLU
                    block.to_out[0] = _with_bias(block.to_out[0])
                elif isinstance(block.to_out, nn.Linear):
                    block.to_out = _with_bias(block.to_out)
        layers.final_norm = BiasedLayerNorm(layers.dim)
        net.to_logits = _with_bias(net.to_logits)


def lean_supported(decoder_args: dict) -> bool:
    for key, value in decoder_args.items():
        if key not in LEAN_DECODER_ARGS:
            return False
        allowed = LEAN_DECODER_ARGS[key]
        if allowed is not None and value not in allowed:
            return False
    return True


class CustomARWrapper(AutoregressiveWrapper):
    """LaTeX-OCR's decoder class (`pix2tex.models.transformer.CustomARWrapper`): an x-transformers
    `AutoregressiveWrapper` around a `TransformerWrapper` decoder with cross-attention. Calling it
    is x-transformers' training loss; `generate` decodes as LaTeX-OCR's did, KV-cached."""

    def start(self, memory: torch.Tensor, max_len: int, beams: int = 1, precision: str = "fp32",
              cache_dtype: torch.dtype | None = None, memory_mask: torch.Tensor | None = None):
        """Decoding state for `memory` [B, N, dim] (and `memory_mask` [B, N], True where a row's
        memory is): x-transformers' own KV cache, which serves any decoder configuration
        (LatexDecoder has a faster one)."""
        return XTransformersState(self, memory, beams, memory_mask)

    @torch.no_grad()
    def generate(self, start_tokens: torch.Tensor, seq_len: int = 256, eos_token: int | None = None,
                 temperature: float = 1.0, filter_logits_fn=top_k, filter_thres: float = 0.9,
                 context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 precision: str = "fp32") -> torch.Tensor:
        """Up to `seq_len` tokens after `start_tokens` ([B, t] or [t]; LaTeX-OCR passes BOS), read
        from `context` (the encoder output [B, N, dim]); returns [B, L] (or [L]).

        As in LaTeX-OCR: sampling at `temperature` from the logits that `filter_logits_fn` keeps
        (top_k: the best (1 - filter_thres) of the vocabulary; top_p: the nucleus of mass
        filter_thres); decoding stops once every row has produced `eos_token`. Differences: a row
        that ended is padded with `pad_value` after its EOS (LaTeX-OCR went on sampling it);
        `temperature=0` is greedy (token for token what `Model.generate` gives); the nucleus is
        taken after dividing by the temperature; a sequence ends at the decoder's `max_seq_len`
        positions (LaTeX-OCR slid a window over its absolute positions); PAD and BOS (the first
        start token) are never sampled unless one of them is `eos_token`. `mask` may only mark
        every start token present."""
        if context is None:
            raise ValueError("generate needs context=: the encoder output [B, N, dim] of the images")
        if mask is not None and not bool(mask.all()):
            raise ValueError("generate: start tokens with padding (a mask with False) are not "
                             "supported; give every row the same number of start tokens")
        if filter_logits_fn not in (top_k, top_p):
            raise ValueError("filter_logits_fn must be x_transformers' top_k or top_p (as in "
                             "LaTeX-OCR)")
        one = start_tokens.dim() == 1
        start = start_tokens[None] if one else start_tokens
        B, t = start.shape
        if context.shape[0] != B:
            raise ValueError(f"generate: {B} rows of start tokens but context has {context.shape[0]}")
        steps = min(int(seq_len), self.max_seq_len - t)
        if steps <= 0:
            out = start.new_empty(B, 0)
            return out[0] if one else out
        vocab = self.net.num_tokens
        keep_k = max(1, int((1 - filter_thres) * vocab)) if filter_logits_fn is top_k else 0
        keep_p = float(filter_thres) if filter_logits_fn is top_p else 1.0
        was_training = self.training
        self.eval()
        try:
            state = self.start(context, t - 1 + steps, precision=precision)
            for i in range(t - 1):  # the start tokens before the last one fill the cache
                state.step(start[:, i])
            eos = -1 if eos_token is None else int(eos_token)  # -1: never matches, as None there
            out = sample(state, B, steps, int(start[0, 0]), eos, self.pad_value,
                         temperature=max(float(temperature), 0.0), top_k=keep_k, top_p=keep_p,
                         device=start.device, first=start[:, -1])
        finally:
            self.train(was_training)
        return out[0] if one else out


class LatexDecoder(CustomARWrapper):
    """The decoder of `Model`: builds its x-transformers net from the config's sizes; calling it
    gives teacher-forced logits (not CustomARWrapper's loss); decoding runs the lean step."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int,
                 decoder_args: dict | None = None, emb_dropout: float = 0.0, pad_value: int = 0,
                 bias: bool = False):
        args = dict(decoder_args or {})
        args.setdefault("cross_attend", True)
        if not args["cross_attend"]:
            raise ValueError("decoder_args.cross_attend must be true: the decoder reads the image "
                             "through cross-attention")
        net = TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=max_seq_len, emb_dropout=emb_dropout,
            attn_layers=Decoder(dim=dim, depth=depth, heads=heads, **args))
        if bias:
            add_biases(net)
        super().__init__(net, pad_value=pad_value)
        route_decoder_attention(self.net)  # faster exact kernels for bf16 training on CPU
        self._prepared = None  # (key, weights) of the last step_weights() call
        self.lean = lean_supported(args)
        if self.lean:
            self._check_lean_structure()

    @property
    def has_bias(self) -> bool:
        """Built with (or given) LaTeX-OCR's decoder biases (`add_biases`)."""
        return isinstance(self.net.attn_layers.final_norm, BiasedLayerNorm)

    def add_biases(self) -> None:
        """Give this decoder LaTeX-OCR's biases (zero: the same function until trained), on the
        device of its weights. Loading a LaTeX-OCR weights file calls this."""
        device = self.net.token_emb.emb.weight.device
        add_biases(self.net)
        self.net.to(device)

    # --- teacher forcing (x-transformers) -------------------------------------------------------
    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, return_hidden: bool = False):
        """tgt_in [B, T] (BOS first), memory [B, N, dim] -> logits [B, T, V] (and the last hidden
        states [B, T, dim], after the final norm)."""
        hidden = self.net(tgt_in, context=memory, return_embeddings=True)
        logits = self.net.to_logits(hidden)
        return (logits, hidden) if return_hidden else logits

    # --- lean KV-cached step --------------------------------------------------------------------
    def _check_lean_structure(self) -> None:
        """The module layout decode_step assumes; a mismatch (new x-transformers version) means
        the lean step would compute something else, so use x-transformers' path instead."""
        net, layers = self.net, self.net.attn_layers
        ok = (isinstance(net.pos_emb, AbsolutePositionalEmbedding) and not net.pos_emb.l2norm_embed
              and _is_identity(net.post_emb_norm) and _is_identity(net.project_emb)
              and net.num_memory_tokens == 0 and getattr(net, "cls_token", None) is None
              and isinstance(net.to_logits, nn.Linear)
              and isinstance(layers.final_norm, XLayerNorm)
              and set(layers.layer_types) <= {"a", "c", "f"})
        for (norms, block, residual), kind in zip(layers.layers, layers.layer_types):
            pre, post_branch, post_main = norms
            ok = ok and isinstance(pre, XLayerNorm) and post_branch is None and post_main is None
            ok = ok and type(residual).__name__ == "Residual" and residual.residual_scale is None
            if kind in "ac":
                ok = ok and isinstance(block, Attention) and block.num_mem_kv == 0 and \
                    block.kv_heads == block.heads and not block.qk_norm and \
                    block.to_v_gate is None and block.to_v_head_gate is None and \
                    not block.head_scale
            else:
                ok = ok and isinstance(block, FeedForward)
        self.lean = bool(ok)

    def _weights(self, precision: str | torch.dtype = "fp32",
                 cache_dtype: torch.dtype | None = None) -> dict:
        """The decoder's weights in the layout decode_step reads (q/k/v of each self-attention
        concatenated into one matmul). precision (or a torch dtype): fp32 | bf16 (matmul weights
        and inputs; the residual stream and layer norms stay float32) | int8 (linear weights
        quantized per output channel and packed, float32 inputs: dynamic quantization).
        cache_dtype: of the KV caches and attention (default: the matmuls'). A few MB;
        `step_weights` keeps them while the parameters are unchanged."""
        net, layers = self.net, self.net.attn_layers
        precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(precision, precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def cast(t):
            return None if t is None else t.detach().to(dtype)

        def linear(w, b=None):  # -> (weight, bias) for _linear
            if precision != "int8":
                return cast(w), cast(b)
            return quantize_int8(w.detach(), None if b is None else b.detach()), None

        def norm_gamma(norm):  # float32, as the residual stream
            return (norm.gamma + float(norm.unit_offset)).detach().float()

        def norm_beta(norm):
            return norm.beta.detach().float() if isinstance(norm, BiasedLayerNorm) else None

        blocks = []
        for (norms, block, _), kind in zip(layers.layers, layers.layer_types):
            gamma, beta = norm_gamma(norms[0]), norm_beta(norms[0])
            if kind in "ac":
                glu = block.attn_on_attn
                out = block.to_out[0] if glu else block.to_out
                entry = {"kind": kind, "gamma": gamma, "beta": beta, "heads": block.heads,
                         "glu": glu}
                entry["w_out"], entry["b_out"] = linear(out.weight, out.bias)
                if kind == "a":
                    entry["w_qkv"] = linear(torch.cat([block.to_q.weight, block.to_k.weight,
                                                       block.to_v.weight]))[0]
                else:
                    entry["w_q"] = linear(block.to_q.weight)[0]
                    # runs once per image: kept in float (not worth quantizing)
                    entry["w_kv"] = cast(torch.cat([block.to_k.weight, block.to_v.weight]))
            else:
                proj_in, proj_out = block.ff[0], block.ff[-1]
                glu = hasattr(proj_in, "proj")
                lin_in, act = (proj_in.proj, proj_in.act) if glu else (proj_in[0], proj_in[-1])
                entry = {"kind": "f", "gamma": gamma, "beta": beta, "glu": glu, "act": act}
                entry["w_in"], entry["b_in"] = linear(lin_in.weight, lin_in.bias)
                entry["w_ff_out"], entry["b_ff_out"] = linear(proj_out.weight, proj_out.bias)
            blocks.append(entry)
        w_logits, b_logits = linear(net.to_logits.weight, net.to_logits.bias)
        return {"blocks": blocks, "dtype": dtype, "precision": precision,
                "cache_dtype": cache_dtype or dtype,
                "tok": net.token_emb.emb.weight.detach().float(),
                "pos": (net.pos_emb.emb.weight * net.pos_emb.scale).detach().float(),
                "final_gamma": norm_gamma(layers.final_norm),
                "final_beta": norm_beta(layers.final_norm),
                "w_logits": w_logits, "b_logits": b_logits}

    def step_weights(self, precision: str = "fp32", cache_dtype: torch.dtype | None = None) -> dict:
        """`_weights`, kept between calls while the parameters are unchanged (int8 packing takes
        ~0.1 s; generation calls this once per batch)."""
        key = (precision, cache_dtype, weights_key(self.parameters()))
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self._weights(precision, cache_dtype))
        return self._prepared[1]

    def cross_kv(self, memory: torch.Tensor, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """memory [B, N, dim] -> cross-attention keys and values, each [Lc, B, H, N, d]."""
        memory = memory.to(weights["dtype"])
        B, N, _ = memory.shape
        ks, vs = [], []
        for blk in weights["blocks"]:
            if blk["kind"] == "c":
                H = blk["heads"]
                kv = _linear(memory, blk["w_kv"]).view(B, N, 2, H, -1).permute(2, 0, 3, 1, 4)
                ks.append(kv[0])
                vs.append(kv[1])
        cache_dtype = weights["cache_dtype"]
        return (torch.stack(ks).to(cache_dtype).contiguous(),
                torch.stack(vs).to(cache_dtype).contiguous())

    def decode_step(self, tokens: torch.Tensor, pos: int, cross_k: torch.Tensor,
                    cross_v: torch.Tensor, self_k: torch.Tensor, self_v: torch.Tensor,
                    weights: dict, inplace: bool = True, cross_mask: torch.Tensor | None = None):
        """One decoder position for a batch.

        tokens [B]: the token at position `pos` (BOS at 0). inplace=True: self_k/self_v are buffers
        with room for position `pos`, which this step writes (earlier positions already there).
        inplace=False: self_k/self_v hold exactly positions 0..pos-1 and are not modified.
        cross_mask [B, 1, 1, N] (additive, in the caches' dtype): memories padded to one length.
        pos [B] (a tensor, inplace only): each row at its own position (StreamState: rows join a
        running decode); the caches then hold zeros where a row has not written yet, masked.
        Returns logits [B, V] for position pos+1 and this position's keys/values [La, B, H, 1, d].
        """
        B = tokens.shape[0]
        x = (weights["tok"][tokens] + weights["pos"][pos])[:, None, :]  # [B, 1, dim] float32
        per_row = torch.is_tensor(pos)
        if per_row:  # attend to positions 0..pos[b] of row b: an additive mask over the longest
            rows, T = torch.arange(B, device=tokens.device), int(pos.max()) + 1
            later = torch.arange(T, device=tokens.device)[None, :] > pos[:, None]
            self_mask = torch.zeros(B, 1, 1, T, dtype=cross_k.dtype, device=tokens.device)
            self_mask = self_mask.masked_fill(later[:, None, None, :], float("-inf"))
        dim, mm = x.shape[-1], weights["dtype"]  # matmul inputs in `mm`; the residual in float32
        a = c = 0
        new_k, new_v = [], []
        for blk in weights["blocks"]:
            h = F.layer_norm(x, (dim,), blk["gamma"], blk["beta"]).to(mm)
            kind = blk["kind"]
            if kind == "a":
                H = blk["heads"]
                qkv = _linear(h, blk["w_qkv"]).to(cross_k.dtype)
                q, k, v = qkv.view(B, 1, 3, H, -1).permute(2, 0, 3, 1, 4)
                new_k.append(k)
                new_v.append(v)
                if per_row:
                    self_k[a][rows, :, pos] = k[:, :, 0]
                    self_v[a][rows, :, pos] = v[:, :, 0]
                    out = F.scaled_dot_product_attention(q, self_k[a, :, :, :T], self_v[a, :, :, :T],
                                                         attn_mask=self_mask)
                else:
                    if inplace:
                        self_k[a, :, :, pos] = k[:, :, 0]
                        self_v[a, :, :, pos] = v[:, :, 0]
                        keys, values = self_k[a, :, :, :pos + 1], self_v[a, :, :, :pos + 1]
                    else:
                        keys, values = torch.cat([self_k[a], k], 2), torch.cat([self_v[a], v], 2)
                    out = F.scaled_dot_product_attention(q, keys, values)
                a += 1
            elif kind == "c":
                H = blk["heads"]
                q = _linear(h, blk["w_q"]).view(B, 1, H, -1).transpose(1, 2)
                out = F.scaled_dot_product_attention(q.to(cross_k.dtype), cross_k[c], cross_v[c],
                                                     attn_mask=cross_mask)
                c += 1
            if kind in "ac":
                out = out.transpose(1, 2).reshape(B, 1, -1).to(mm)
                out = _linear(out, blk["w_out"], blk["b_out"])
                if blk["glu"]:
                    out = F.glu(out, dim=-1)
            else:
                out = _linear(h, blk["w_in"], blk["b_in"])
                if blk["glu"]:
                    up, gate = out.chunk(2, dim=-1)
                    out = up * blk["act"](gate)
                else:
                    out = blk["act"](out)
                out = _linear(out, blk["w_ff_out"], blk["b_ff_out"])
            x = x + out  # float32 + bf16 -> float32
        x = F.layer_norm(x, (dim,), weights["final_gamma"], weights["final_beta"]).to(mm)
        logits = _linear(x[:, 0], weights["w_logits"], weights["b_logits"])
        return logits, torch.stack(new_k), torch.stack(new_v)

    def start(self, memory: torch.Tensor, max_len: int, beams: int = 1, precision: str = "fp32",
              cache_dtype: torch.dtype | None = None, memory_mask: torch.Tensor | None = None):
        """Decoding state for `memory` [B, N, dim], each image repeated `beams` times (rows
        b*beams ... b*beams+beams-1), with room for `max_len` positions. memory_mask [B, N]
        (bool, True where a row's memory is): memories of several lengths padded to one."""
        if self.lean:
            return LeanState(self, memory, max_len, beams, precision, cache_dtype, memory_mask)
        return super().start(memory, max_len, beams, precision, cache_dtype, memory_mask)


    def stream(self, max_len: int, precision: str = "fp32",
               cache_dtype: torch.dtype | None = None) -> "StreamState":
        """An empty decoding state that rows join and leave between steps (continuous batching;
        the lean step only)."""
        if not self.lean:
            raise ValueError("continuous batching needs the lean decoding step, which these "
                             "decoder_args do not have")
        return StreamState(self, max_len, precision, cache_dtype)


def get_decoder(cfg) -> LatexDecoder:
    """The decoder a config describes (random weights)."""
    return LatexDecoder(num_tokens=cfg.num_tokens, max_seq_len=cfg.max_seq_len, dim=cfg.dim,
                        depth=cfg.num_layers, heads=cfg.heads,
                        decoder_args=dict(cfg.decoder_args or {}),
                        emb_dropout=cfg.get("emb_dropout", 0.0), pad_value=cfg.pad_token,
                        bias=bool(cfg.get("decoder_bias", False)))


def additive_mask(memory_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] bool (True where a row's memory is) -> [B, 1, 1, N] additive attention mask: 0 there,
    -inf on the padding."""
    mask = torch.zeros(memory_mask.shape, dtype=dtype, device=memory_mask.device)
    return mask.masked_fill(~memory_mask.bool(), float("-inf"))[:, None, None, :]


class LeanState:
    """Preallocated KV cache + decode_step: step(tokens) -> float logits; select(rows)."""

    def __init__(self, decoder: LatexDecoder, memory: torch.Tensor, max_len: int, beams: int,
                 precision: str, cache_dtype: torch.dtype | None = None,
                 memory_mask: torch.Tensor | None = None):
        self.decoder, self.weights = decoder, decoder.step_weights(precision, cache_dtype)
        self.cross_k, self.cross_v = decoder.cross_kv(memory, self.weights)
        self.cross_mask = None if memory_mask is None else additive_mask(memory_mask, self.cross_k.dtype)
        if beams > 1:  # the encoder and the cross keys/values ran once per image
            self.cross_k = self.cross_k.repeat_interleave(beams, dim=1)
            self.cross_v = self.cross_v.repeat_interleave(beams, dim=1)
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.repeat_interleave(beams, dim=0)
        La = sum(b["kind"] == "a" for b in self.weights["blocks"])
        _, B, H, _, d = self.cross_k.shape
        self.self_k = self.cross_k.new_empty(La, B, H, max_len, d)
        self.self_v = torch.empty_like(self.self_k)
        self.pos = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, _, _ = self.decoder.decode_step(tokens, self.pos, self.cross_k, self.cross_v,
                                                self.self_k, self.self_v, self.weights,
                                                cross_mask=self.cross_mask)
        self.pos += 1
        return logits.float()

    def select(self, rows: torch.Tensor, cross: bool = True) -> None:
        """Keep batch rows `rows` (in that order). cross=False when the rows come from the same
        images in the same positions (beam reordering): the cross cache is unchanged then."""
        if cross:
            self.cross_k, self.cross_v = self.cross_k[:, rows], self.cross_v[:, rows]
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask[rows]
        k = self.self_k.new_empty(self.self_k.shape[0], len(rows), *self.self_k.shape[2:])
        v = torch.empty_like(k)
        k[:, :, :, :self.pos] = self.self_k[:, rows, :, :self.pos]
        v[:, :, :, :self.pos] = self.self_v[:, rows, :, :self.pos]
        self.self_k, self.self_v = k, v


class XTransformersState:
    """x-transformers' own KV-cached path, for decoder_args the lean step does not cover."""

    def __init__(self, decoder: CustomARWrapper, memory: torch.Tensor, beams: int,
                 memory_mask: torch.Tensor | None = None):
        self.net = decoder.net
        self.memory = memory.repeat_interleave(beams, dim=0) if beams > 1 else memory
        self.memory_mask = memory_mask
        if memory_mask is not None and beams > 1:
            self.memory_mask = memory_mask.repeat_interleave(beams, dim=0)
        self.seq = None
        self.cache = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, None]
        self.seq = tokens if self.seq is None else torch.cat([self.seq, tokens], dim=1)
        logits, self.cache = self.net(self.seq, context=self.memory, context_mask=self.memory_mask,
                                      cache=self.cache, return_intermediates=True)
        return logits[:, -1].float()

    def select(self, rows: torch.Tensor, cross: bool = True) -> None:
        self.memory, self.seq = self.memory[rows], self.seq[rows]
        if self.memory_mask is not None:
            self.memory_mask = self.memory_mask[rows]
        for inter in self.cache.attn_intermediates:
            if inter.cached_kv is not None:
                inter.cached_kv = [t[rows] for t in inter.cached_kv]


class StreamState:
    """A decoding state that rows join and leave between steps (continuous batching): each row
    keeps its own position, so an image that joins a running decode starts at BOS while the others
    go on, and a finished row leaves at once. step(tokens) -> float logits; join(memory);
    select(rows). The self-attention caches are zeroed and masked beyond each row's position; the
    cross caches of memories of different lengths are padded to the longest and masked."""

    def __init__(self, decoder: LatexDecoder, max_len: int, precision: str,
                 cache_dtype: torch.dtype | None = None):
        self.decoder, self.weights = decoder, decoder.step_weights(precision, cache_dtype)
        self.max_len = max_len
        self.La = sum(b["kind"] == "a" for b in self.weights["blocks"])
        self.cross_k = self.cross_v = self.cross_mask = self.self_k = self.self_v = None
        self.pos = None  # [B] long: the position each row decodes next

    def __len__(self) -> int:
        return 0 if self.pos is None else len(self.pos)

    def join(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> None:
        """Add one row per image of `memory` [b, N, dim] (memory_mask [b, N] as `start`'s), after
        the rows already there; each starts at position 0 (its first step's token is BOS)."""
        k, v = self.decoder.cross_kv(memory, self.weights)  # [Lc, b, H, N, d]
        mask = additive_mask(memory_mask, k.dtype) if memory_mask is not None else \
            torch.zeros(k.shape[1], 1, 1, k.shape[3], dtype=k.dtype, device=k.device)
        _, b, H, _, d = k.shape
        if not len(self):
            self.cross_k, self.cross_v, self.cross_mask = k, v, mask
            self.self_k = k.new_zeros(self.La, 0, H, self.max_len, d)
            self.self_v = torch.zeros_like(self.self_k)
            self.pos = torch.zeros(0, dtype=torch.long, device=k.device)
        else:
            n = max(self.cross_k.shape[3], k.shape[3])
            self.cross_k, self.cross_v, self.cross_mask = (
                torch.cat([_pad_to(old, n, dim, fill), _pad_to(new, n, dim, fill)], batch)
                for old, new, dim, batch, fill in ((self.cross_k, k, 3, 1, 0.0),
                                                   (self.cross_v, v, 3, 1, 0.0),
                                                   (self.cross_mask, mask, 3, 0, None)))
        self.self_k = torch.cat([self.self_k, self.self_k.new_zeros(self.La, b, H, self.max_len, d)], 1)
        self.self_v = torch.cat([self.self_v, self.self_v.new_zeros(self.La, b, H, self.max_len, d)], 1)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b)])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B]: each row's token at its position -> logits [B, V] for the next one."""
        logits, _, _ = self.decoder.decode_step(tokens, self.pos, self.cross_k, self.cross_v,
                                                self.self_k, self.self_v, self.weights,
                                                cross_mask=self.cross_mask)
        self.pos = self.pos + 1
        return logits.float()

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (in that order)."""
        self.cross_k, self.cross_v = self.cross_k[:, rows], self.cross_v[:, rows]
        self.cross_mask, self.pos = self.cross_mask[rows], self.pos[rows]
        self.self_k, self.self_v = self.self_k[:, rows], self.self_v[:, rows]


def _pad_to(t: torch.Tensor, n: int, dim: int, fill: float | None = 0.0) -> torch.Tensor:
    """`t` padded along `dim` to length n with `fill` (None: -inf, a masked memory position)."""
    if t.shape[dim] == n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    pad = t.new_full(shape, float("-inf") if fill is None else fill)
    return torch.cat([t, pad], dim)
