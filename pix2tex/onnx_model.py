"""Run an ONNX export (a folder written by `python -m pix2tex.export`) with onnxruntime, without torch.

    model = OnnxModel("export/pix2tex")
    ids = model.generate(images)     # images float32 [B, 1, H, W], normalized -> ids [B, L]
    ids = model.generate_sizes([a, b])   # images [1, H, W] of several sizes, one decoding batch

`greedy` is `models/generate.sample` at temperature 0 over the exported decoder step: the same
loop (a row leaves the batch at its EOS) and the same PAD/BOS mask (pix2tex.special_tokens), so
the ids equal PyTorch's float32 greedy decoding. The folder's layout is described in
pix2tex/export.py, which writes it.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from pix2tex.cancel import stop_if_asked
from pix2tex.special_tokens import mask_pad_bos

META = "pix2tex_onnx.json"


def greedy(step, cross_k: np.ndarray, cross_v: np.ndarray, cache: dict, max_len: int, bos: int,
           eos: int, pad: int, should_stop: Callable[[], bool] | None = None,
           cross_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding from BOS -> (ids [B, L] without BOS, each row ending at its EOS, then PAD;
    each row's sequence log-probability [B], as models/generate.py's `sample`).

    `step(feeds) -> (logits [B, V], self_k_out, self_v_out)` runs decoder_step.onnx on feeds named
    as its inputs; `cross_k`, `cross_v` are the encoder graph's outputs; `cache` the geometry
    {layers, heads, head_dim} of the self-attention cache, which starts empty. `should_stop` is
    asked before each step: True raises pix2tex.cancel.DecodeCancelled. cross_mask [B, N]: fed to
    a step graph that has that input (0 on each row's memory, -inf on its padding)."""
    B = cross_k.shape[1]
    self_k = np.zeros((cache["layers"], B, cache["heads"], 0, cache["head_dim"]), np.float32)
    self_v = self_k
    out = np.full((B, max_len), pad, np.int64)
    rows = np.arange(B)  # original row of each active row
    tokens = np.full(B, bos, np.int64)
    logprob = np.zeros(B, np.float64)
    length = 0
    for t in range(max_len):
        stop_if_asked(should_stop)
        feeds = {"tokens": tokens, "cross_k": cross_k, "cross_v": cross_v, "self_k": self_k,
                 "self_v": self_v}
        if cross_mask is not None:
            feeds["cross_mask"] = cross_mask
        logits, self_k, self_v = step(feeds)
        logits = mask_pad_bos(logits, bos, eos, pad)
        tokens = logits.argmax(-1).astype(np.int64)
        out[rows, t] = tokens
        top = logits[np.arange(len(tokens)), tokens].astype(np.float64)  # the row's maximum
        logprob[rows] -= np.log(np.exp(logits - top[:, None]).sum(-1))  # log softmax at the argmax
        length = t + 1
        done = tokens == eos
        if done.any():
            keep = np.flatnonzero(~done)
            if keep.size == 0:
                break
            rows, tokens = rows[keep], tokens[keep]
            cross_k, cross_v = cross_k[:, keep], cross_v[:, keep]
            self_k, self_v = self_k[:, keep], self_v[:, keep]
            if cross_mask is not None:
                cross_mask = cross_mask[keep]
    return out[:, :length], logprob


class OnnxModel:
    """The exported graphs behind `generate(images) -> ids`, like `Model.generate` (greedy)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        folder = os.fspath(folder)
        meta_path = os.path.join(folder, META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{folder} is not an ONNX export (no {META}); write one with "
                                    f"`python -m pix2tex.export --onnx --checkpoint CKPT --out {folder}`")
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        self.config = self.meta["config"]
        self.tokenizer_sha256 = self.meta.get("tokenizer_sha256")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(os.path.join(folder, "encoder.onnx"), opts, providers=providers)
        self.step = ort.InferenceSession(os.path.join(folder, "decoder_step.onnx"), opts, providers=providers)
        # exports from before the memory mask decode one image size per batch
        self.masks_memory = any(i.name == "cross_mask" for i in self.step.get_inputs())

    def generate(self, images: np.ndarray, max_len: int | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 return_logprob: bool = False):
        """images float32 [B, 1, H, W] (normalized) -> ids [B, L] without BOS, EOS then PAD (and
        with return_logprob each row's sequence log-probability). should_stop: as in `greedy`."""
        cross_k, cross_v = self.encoder.run(None, {"images": np.ascontiguousarray(images, np.float32)})
        mask = np.zeros(cross_k.shape[1:2] + cross_k.shape[3:4], np.float32) if self.masks_memory else None
        ids, logprob = self._greedy(cross_k, cross_v, mask, max_len, should_stop)
        return (ids, logprob) if return_logprob else ids

    def generate_sizes(self, images: list[np.ndarray], max_len: int | None = None,
                       should_stop: Callable[[], bool] | None = None,
                       return_logprob: bool = False):
        """Images float32 [1, H, W] (normalized) of several sizes -> ids [B, L], decoded as one
        batch: each size encoded on its own, the cross keys/values padded to the longest memory
        and the padding masked. The ids equal one-image-at-a-time decoding. return_logprob: as in
        `generate`."""
        if not self.masks_memory:
            raise ValueError("this ONNX export decodes one image size per batch (exported before "
                             "the memory mask); export it again with `python -m pix2tex.export`")
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        parts = {}
        for rows in by_shape.values():
            batch = np.ascontiguousarray(np.stack([images[i] for i in rows]), np.float32)
            k, v = self.encoder.run(None, {"images": batch})
            parts.update((i, (k[:, j], v[:, j])) for j, i in enumerate(rows))
        longest = max(k.shape[2] for k, _ in parts.values())  # k: [layers, heads, N, head_dim]
        L, H, _, d = next(iter(parts.values()))[0].shape
        cross_k = np.zeros((L, len(images), H, longest, d), np.float32)
        cross_v = np.zeros_like(cross_k)
        mask = np.full((len(images), longest), -np.inf, np.float32)
        for i, (k, v) in parts.items():
            n = k.shape[2]
            cross_k[:, i, :, :n], cross_v[:, i, :, :n], mask[i, :n] = k, v, 0.0
        ids, logprob = self._greedy(cross_k, cross_v, mask, max_len, should_stop)
        return (ids, logprob) if return_logprob else ids

    def _greedy(self, cross_k, cross_v, mask, max_len, should_stop) -> tuple[np.ndarray, np.ndarray]:
        m = self.meta
        max_len = min(max_len or m["max_seq_len"] - 1, m["max_seq_len"])
        return greedy(lambda feeds: self.step.run(None, feeds), cross_k, cross_v, m["cache"],
                      max_len, m["bos"], m["eos"], m["pad"], should_stop=should_stop,
                      cross_mask=mask)
