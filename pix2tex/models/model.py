"""Model = image encoder (hybrid | vit | resnet) + transformer decoder; get_model(config).

    loss = model(images, tgt)                      # CE on tgt[:, 1:] given tgt[:, :-1], PAD ignored
    memory = model.encode(images)                  # [B, N, dim]
    logits = model.logits(images, tgt_in)          # [B, T, V]; memory=... skips the encoder
    ids = model.generate(images, beam_width=5)     # [B, L] without BOS, EOS then PAD
    memory, mask = model.encode_sizes([img_a, img_b])  # images of different sizes ...
    ids = model.generate(memory=memory, memory_mask=mask)  # ... decoded as one batch

Generation runs the encoder once per image, then the decoder's KV-cached step. Inference
(`inference_precision`) runs the encoder through a frozen copy (weight standardization folded into
the conv weights, channels-last, bf16 or fp32) and the decoder step on fp32, bf16 or int8 weights.
The training forward is always the plain modules.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Conv2dSame, StdConv2dSame

from . import hybrid, resnet, vit
from .decoder import LatexDecoder, get_decoder, weights_key
from .generate import beam_search, sample

ENCODERS = {"hybrid": hybrid.get_encoder, "vit": vit.get_encoder, "resnet": resnet.get_encoder}
PRECISIONS = ("fp32", "bf16", "int8")


def cpu_has_fast_bf16() -> bool:
    """AMX (or AVX512-BF16) matmuls: bf16 is several times faster than fp32 on this CPU."""
    try:
        return bool(torch.cpu._is_amx_tile_supported()) or \
            bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (or None) -> cuda when CUDA is available, else cpu; a CUDA device asked for where there
    is none is an error that says so."""
    want = str(device) if device is not None else "auto"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu")
    return torch.device(want)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA; int8 on CPUs with AMX / AVX512-BF16 (which also have int8 dot
    products): int8 decoder linears, bf16 encoder and caches; fp32 elsewhere. The check that
    this keeps a trained model's greedy outputs: bench/inference_precision.py."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16"
        else:
            precision = "int8" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"inference_precision must be auto, {', '.join(PRECISIONS)}; "
                         f"got {precision!r}")
    if precision == "int8" and device.type != "cpu":
        raise ValueError("inference_precision=int8 (dynamic quantization) runs on CPU only")
    return precision


def encoder_dtype(precision: str) -> torch.dtype:
    """int8 quantizes the decoder's linear layers; the encoder's convolutions then run in bf16
    where that is fast."""
    if precision == "int8":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def fold_weight_standardization(module: nn.Module) -> nn.Module:
    """Replace each StdConv2dSame by a plain (same-padded) conv holding its standardized weight:
    the same function without re-standardizing the weights at every call (inference only)."""
    for parent in list(module.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, StdConv2dSame):
                continue
            w = hybrid.standardized_weight(conv)
            if conv.same_pad:
                plain = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size,
                                   conv.stride, 0, conv.dilation, conv.groups,
                                   bias=conv.bias is not None)
            else:
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                  conv.stride, conv.padding, conv.dilation, conv.groups,
                                  bias=conv.bias is not None)
            plain.weight.data.copy_(w)
            if conv.bias is not None:
                plain.bias.data.copy_(conv.bias)
            setattr(parent, name, plain)
    return module


class Model(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: LatexDecoder, cfg):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.pad, self.bos, self.eos = cfg.pad_token, cfg.bos_token, cfg.eos_token
        self.max_height, self.max_width = cfg.max_height, cfg.max_width
        self.patch_size = cfg.patch_size
        self.max_seq_len = cfg.max_seq_len
        self.inference_precision = cfg.get("inference_precision", "fp32")
        self.compile_inference = bool(cfg.get("compile", False))
        self._frozen_encoder = None  # (key, module): inference copy of the encoder

    # --- training / teacher forcing -------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H > self.max_height or W > self.max_width or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} must be multiples of patch_size="
                             f"{self.patch_size} and at most max_height x max_width = "
                             f"{self.max_height}x{self.max_width}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> memory [B, N, dim]."""
        self.check_images(images)
        return self.encoder(images)

    def decode_logits(self, memory: torch.Tensor, tgt_in: torch.Tensor,
                      return_hidden: bool = False):
        """Teacher-forced logits [B, T, V] from precomputed memory (a teacher's encoder runs
        once)."""
        out = self.decoder(tgt_in, memory, return_hidden=return_hidden)
        if return_hidden:
            logits, hidden = out
            return logits, {"encoder": memory, "decoder": hidden}
        return out

    def logits(self, images: torch.Tensor | None, tgt_in: torch.Tensor, return_hidden: bool = False,
               memory: torch.Tensor | None = None):
        """logits [B, T, V]; with return_hidden also {"encoder": memory, "decoder": [B, T, dim]}."""
        if memory is None:
            memory = self.encode(images)
        return self.decode_logits(memory, tgt_in, return_hidden=return_hidden)

    def loss_labels(self, tgt_ids: torch.Tensor) -> torch.Tensor:
        """tgt_ids[:, 1:] with every position after the first EOS (and any PAD) set to -100.

        Masking by position, not only by the PAD id: nothing after EOS is trained on, whatever it
        holds (LaTeX-OCR trained its decoder to predict the padding as well)."""
        labels = tgt_ids[:, 1:]
        is_eos = labels == self.eos
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        return labels.masked_fill(after_eos | (labels == self.pad), -100)

    def forward(self, images: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of tgt_ids[:, 1:] given tgt_ids[:, :-1] over the tokens up to and
        including each row's EOS (padding after it ignored)."""
        logits = self.logits(images, tgt_ids[:, :-1])
        # [B*T, V] rows: log-softmax over contiguous memory (the [B, V, T] form copies it first)
        return F.cross_entropy(logits.flatten(0, 1).float(), self.loss_labels(tgt_ids).flatten(),
                               ignore_index=-100)

    # --- inference ------------------------------------------------------------------------------
    def _inference_encoder(self, dtype: torch.dtype) -> nn.Module:
        """A frozen copy of the encoder for `dtype`, rebuilt whenever the weights change."""
        key = (dtype, weights_key([*self.encoder.parameters(), *self.encoder.buffers()]))
        if self._frozen_encoder is None or self._frozen_encoder[0] != key:
            frozen = fold_weight_standardization(copy.deepcopy(self.encoder)).eval()
            frozen = frozen.to(dtype=dtype, memory_format=torch.channels_last)
            frozen.requires_grad_(False)
            if self.compile_inference:
                # static shapes: each image size compiles once (tens of seconds on a CPU; dynamic
                # shapes compiled far slower here), past torch's recompile limit it runs eagerly
                frozen = torch.compile(frozen, dynamic=False)
            self._frozen_encoder = (key, frozen)
        return self._frozen_encoder[1]

    @torch.inference_mode()
    def encode_for_inference(self, images: torch.Tensor,
                             precision: str | None = None) -> torch.Tensor:
        """Encoder output [B, N, dim] (float32) through the frozen inference copy."""
        self.check_images(images)
        precision = resolve_precision(precision or self.inference_precision, images.device)
        dtype = encoder_dtype(precision)
        x = images.to(dtype).contiguous(memory_format=torch.channels_last)
        return self._inference_encoder(dtype)(x).float()

    @torch.inference_mode()
    def encode_sizes(self, images: list[torch.Tensor],
                     precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [C, H, W] of any sizes -> (memory [B, N, dim], memory_mask [B, N]): each size
        encoded as its own batch (an image's encoding never sees another's padding), the
        memories padded with zeros to the longest, the mask True where a row's own memory is."""
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        parts = {}
        for rows in by_shape.values():
            memory = self.encode_for_inference(torch.stack([images[i] for i in rows]), precision)
            parts.update(zip(rows, memory))
        longest = max(m.shape[0] for m in parts.values())
        memory = parts[0].new_zeros(len(images), longest, parts[0].shape[-1])
        mask = torch.zeros(len(images), longest, dtype=torch.bool, device=memory.device)
        for i, m in parts.items():
            memory[i, :m.shape[0]] = m
            mask[i, :m.shape[0]] = True
        return memory, mask

    @torch.inference_mode()
    def generate(self, images: torch.Tensor | None = None, max_len: int | None = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, beam_width: int = 1,
                 length_penalty: float = 1.0, memory: torch.Tensor | None = None, min_len: int = 0,
                 precision: str | None = None, generator: torch.Generator | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 memory_mask: torch.Tensor | None = None, return_logprob: bool = False,
                 return_beams: bool = False):
        """Token ids [B, L] without BOS; each row ends at its EOS, PAD after it.

        temperature 0: greedy; >0: sampling (with top_k / top_p filtering). beam_width > 1: beam
        search (deterministic; score = sum log p / length**length_penalty). min_len forbids EOS
        before that many tokens (min_len = max_len forces exactly max_len tokens, for benchmarks).
        precision: fp32 | bf16 | int8 (CPU: dynamic int8 decoder linears) | auto (default: the
        model's inference_precision). should_stop: asked before each decoding step; True stops the
        decode with pix2tex.cancel.DecodeCancelled (a caller's time limit). memory_mask [B, N]:
        with `memory` from `encode_sizes`, images of several sizes in one batch. return_logprob:
        (ids, each row's sequence log-probability [B]) (generate.py). return_beams (beam_width > 1):
        (ids [B, k, L], log-probabilities [B, k]) of every image's k best hypotheses, best first.
        """
        max_len = min(max_len or self.max_seq_len - 1, self.max_seq_len)
        was_training = self.training
        self.eval()
        try:
            if memory is None:
                memory = self.encode_for_inference(images, precision)
            device = memory.device
            precision = resolve_precision(precision or self.inference_precision, device)
            B = memory.shape[0]
            # int8: the KV caches and attention in bf16 where that is fast (encoder_dtype)
            state = self.decoder.start(memory, max_len, beams=max(beam_width, 1),
                                       precision=precision, cache_dtype=encoder_dtype(precision),
                                       memory_mask=memory_mask)
            if beam_width > 1:
                return beam_search(state, B, beam_width, max_len, self.bos, self.eos, self.pad,
                                   length_penalty=length_penalty, min_len=min_len, device=device,
                                   should_stop=should_stop, return_logprob=return_logprob,
                                   return_beams=return_beams)
            return sample(state, B, max_len, self.bos, self.eos, self.pad, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_len=min_len, device=device,
                          generator=generator, should_stop=should_stop,
                          return_logprob=return_logprob)
        finally:
            self.train(was_training)


def get_model(cfg) -> Model:
    """Build the model a config describes (random weights; load a checkpoint's `model` after)."""
    structure = cfg.encoder_structure.lower()
    if structure not in ENCODERS:
        raise ValueError(f"encoder_structure must be one of {sorted(ENCODERS)}, got {structure!r}")
    encoder = ENCODERS[structure](cfg)
    return Model(encoder, get_decoder(cfg), cfg)
