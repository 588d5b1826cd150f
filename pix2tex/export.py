"""ONNX export: an encoder graph and a one-token decoder-step graph with the KV cache as tensors.

    python -m pix2tex.export --onnx --checkpoint checkpoints/pix2tex/best.pth --out export/pix2tex
    pix2tex --backend onnx --checkpoint export/pix2tex formula.png
    LatexOCR(checkpoint="export/pix2tex", backend="onnx")

The folder holds:
  encoder.onnx       images [B, 1, H, W] -> cross_k, cross_v [Lc, B, heads, N, d]: the encoder
                     and every cross-attention layer's keys/values of its output (computed once)
  decoder_step.onnx  tokens [B], cross_k, cross_v, self_k, self_v [La, B, heads, T, d]
                     -> logits [B, V], self_k_out, self_v_out [La, B, heads, T+1, d]
                     (the position is T: the cache holds exactly the tokens before it)
  tokenizer.json, pix2tex_onnx.json (config, tokenizer hash, special ids)

`pix2tex.onnx_model.OnnxModel` runs them with onnxruntime in the same greedy loop as
`Model.generate` (a row leaves the batch at its EOS; PAD and BOS are never output), so the ids
equal PyTorch's float32 greedy decoding; `--check` compares the two on images.
The step reuses the decoder's lean `decode_step` (pix2tex/models/decoder.py), which covers the
default decoder options; others cannot be exported (the error says which).
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import argparse
import copy
import json
import os
import shutil
import sys
import time
import warnings

from pix2tex.fileio import atomic_open, file_sha256
from pix2tex.onnx_model import META

OPSET = 18


# --- export (torch) --------------------------------------------------------------------------------

def static_same_padding(module):
    """Replace timm's dynamic 'same' padding (Conv2dSame, MaxPool2dSame) by fixed pads, in place.

    For an input side divisible by the stride, 'same' padding is max((k-1)*d + 1 - s, 0) whatever
    the size. Every size the encoder sees is: H and W are multiples of patch_size, which the
    encoder's total stride divides (see models/hybrid.py). Without the shape arithmetic the export
    traces in seconds instead of many minutes, and the graph has no shape-dependent Pad.
    """
    import torch.nn.functional as F
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame
    from torch import nn

    class Padded(nn.Module):
        def __init__(self, layer, base, value):
            super().__init__()
            self.layer, self.base, self.value = layer, base, value
            pads = []
            for k, s, d in zip(layer.kernel_size, layer.stride, layer.dilation):
                total = max((k - 1) * d + 1 - s, 0)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            self.pad = (left, right, top, bottom)

        def forward(self, x):
            # base.forward: the layer's own op with padding 0 (which these subclasses set)
            return self.base.forward(self.layer, F.pad(x, self.pad, value=self.value))

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                setattr(parent, name, Padded(child, nn.Conv2d, 0.0))
            elif isinstance(child, MaxPool2dSame):
                setattr(parent, name, Padded(child, nn.MaxPool2d, float("-inf")))
    return module


def _lean_weights(model) -> dict:
    if not model.decoder.lean:
        raise ValueError("this model's decoder_args are outside what the lean decode step covers "
                         "(see LEAN_DECODER_ARGS in pix2tex/models/decoder.py); it cannot be exported")
    return model.decoder._weights("fp32")


def encoder_graph(model):
    """images -> (cross_k, cross_v): the encoder (weight standardization folded, fixed 'same'
    pads) and the cross-attention keys/values of its output, in float32."""
    from torch import nn

    from pix2tex.models.model import fold_weight_standardization

    decoder, weights = model.decoder, _lean_weights(model)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = static_same_padding(fold_weight_standardization(
                copy.deepcopy(model.encoder))).eval()

        def forward(self, images):
            return decoder.cross_kv(self.encoder(images), weights)

    return Encoder().eval()


def decoder_step_graph(model):
    """(tokens, cross_k, cross_v, self_k, self_v, cross_mask) -> (logits, self_k + new, self_v +
    new): the decoder's lean KV-cached step, its position being the cache length. cross_mask
    [B, N] is added to the cross-attention scores: 0 where a row's memory is, -inf where it is
    padding (images of several sizes in one batch)."""
    import torch
    from torch import nn

    decoder, weights = model.decoder, _lean_weights(model)

    class DecoderStep(nn.Module):
        def forward(self, tokens, cross_k, cross_v, self_k, self_v, cross_mask):
            logits, k, v = decoder.decode_step(tokens, self_k.shape[3], cross_k, cross_v, self_k,
                                               self_v, weights, inplace=False,
                                               cross_mask=cross_mask[:, None, None, :])
            return logits, torch.cat([self_k, k], 3), torch.cat([self_v, v], 3)

    return DecoderStep().eval(), sum(b["kind"] == "a" for b in weights["blocks"])


def _export(module, args, path, names_in, names_out, dynamic_shapes, opset):
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        # the exporter notes, for every shared dynamic axis, that it keeps one name: noise here
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        torch.onnx.export(module, args, path, input_names=names_in, output_names=names_out,
                          dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)


def export_encoder(model, cfg, path: str, opset: int = OPSET) -> None:
    """encoder.onnx: any batch, any H x W that are multiples of patch_size up to the maxima."""
    import torch
    from torch.export import Dim

    p = cfg.patch_size
    images = torch.zeros(2, cfg.channels, 2 * p, 3 * p)  # sizes 0 and 1 would be specialized
    rows = Dim("rows", min=1, max=cfg.max_height // p)
    cols = Dim("cols", min=1, max=cfg.max_width // p)
    _export(encoder_graph(model), (images,), path, ["images"], ["cross_k", "cross_v"],
            {"images": {0: Dim("batch", min=1, max=4096), 2: p * rows, 3: p * cols}}, opset)


def export_decoder_step(model, cfg, path: str, opset: int = OPSET) -> dict:
    """decoder_step.onnx: any batch, memory length and cache length (0 at the first step).
    Returns the cache geometry {layers, heads, head_dim}."""
    import torch
    from torch.export import Dim

    p = cfg.patch_size
    step, layers = decoder_step_graph(model)
    with torch.no_grad():
        cross_k, cross_v = encoder_graph(model)(torch.zeros(2, cfg.channels, 2 * p, 3 * p))
    heads, head_dim = cross_k.shape[2], cross_k.shape[4]  # as LeanState: self cache = cross's
    past = torch.zeros(layers, 2, heads, 3, head_dim)
    batch = Dim("batch", min=1, max=4096)
    memory = {1: batch, 3: Dim("memory", min=1, max=(cfg.max_height // p) * (cfg.max_width // p) + 1)}
    cache = {1: batch, 3: Dim("past", min=0, max=cfg.max_seq_len)}
    cross_mask = torch.zeros(2, cross_k.shape[3])
    cross_mask[1, -2:] = float("-inf")
    _export(step, (torch.tensor([5, 6]), cross_k, cross_v, past, past.clone(), cross_mask), path,
            ["tokens", "cross_k", "cross_v", "self_k", "self_v", "cross_mask"],
            ["logits", "self_k_out", "self_v_out"],
            {"tokens": {0: batch}, "cross_k": memory, "cross_v": memory, "self_k": cache,
             "self_v": cache, "cross_mask": {0: batch, 1: memory[3]}}, opset)
    return {"layers": layers, "heads": heads, "head_dim": head_dim}


def export_model(model, cfg, out_dir: str | os.PathLike, tokenizer: str | None = None,
                 source: str | None = None, opset: int = OPSET) -> dict:
    """Write encoder.onnx, decoder_step.onnx, pix2tex_onnx.json (and a copy of `tokenizer`) for a
    `Model` and its config. Returns the metadata written."""
    from pix2tex.config import to_dict

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    export_encoder(model, cfg, os.path.join(out_dir, "encoder.onnx"), opset)
    cache = export_decoder_step(model, cfg, os.path.join(out_dir, "decoder_step.onnx"), opset)
    tok_sha = None
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(out_dir, "tokenizer.json"))
        tok_sha = file_sha256(tokenizer)
    meta = {"config": to_dict(cfg), "tokenizer_sha256": tok_sha, "checkpoint": source,
            "bos": cfg.bos_token, "eos": cfg.eos_token, "pad": cfg.pad_token,
            "max_seq_len": cfg.max_seq_len, "cache": cache, "opset": opset}
    with open(os.path.join(out_dir, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return meta


def store_exact_bf16(path: str | os.PathLike, min_size: int = 64) -> dict:
    """Rewrite the ONNX file at `path` so every float32 weight that bfloat16 holds exactly (all of
    a bf16 release's, except those the export computed, e.g. folded weight standardization) is
    stored as bfloat16 with a Cast back to float32 in front of the graph: the graph computes the
    very same numbers, and the file is about half. Returns {"converted", "bytes_before", "bytes_after"}."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = os.fspath(path)
    before = os.path.getsize(path)
    model = onnx.load(path)
    graph = model.graph
    inputs = {i.name for i in graph.input}
    kept, casts = [], []
    for init in graph.initializer:
        bits = None
        if init.data_type == TensorProto.FLOAT and init.name not in inputs:
            w = numpy_helper.to_array(init)
            if w.size >= min_size:  # small constants (shapes, scales) are not worth a Cast node
                bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
        if bits is None or np.any(bits & 0xFFFF):  # not exact in bf16: keep float32
            kept.append(init)
            continue
        name = f"{init.name}__bf16"
        kept.append(helper.make_tensor(name, TensorProto.BFLOAT16, w.shape,
                                       (bits >> 16).astype(np.uint16).tobytes(), raw=True))
        casts.append(helper.make_node("Cast", [name], [init.name], to=TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(kept)
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    with atomic_open(path, "wb") as f:
        f.write(model.SerializeToString())
    return {"converted": len(casts), "bytes_before": before, "bytes_after": os.path.getsize(path)}


def export_onnx(ocr, out_dir: str | os.PathLike, opset: int = OPSET) -> dict:
    """Write the ONNX folder for a loaded torch `LatexOCR` (its model, config and tokenizer)."""
    return export_model(ocr.model, ocr.cfg, out_dir, ocr.tokenizer.path, ocr.checkpoint, opset)


# --- command line ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pix2tex.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", action="store_true", help="export to ONNX (the only format for now)")
    p.add_argument("--checkpoint", "-c", help="trained checkpoint (default: the shipped model)")
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the checkpoint names)")
    p.add_argument("--out", "-o", default="export/pix2tex", help="output folder")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--check", nargs="*", default=[], metavar="IMAGE",
                   help="images to decode with both backends afterwards (the LaTeX must be equal)")
    a = p.parse_args(argv)
    if not a.onnx:
        p.error("say which format: --onnx")
    from pix2tex.predict import LatexOCR, quiet_third_party_warnings
    from pix2tex.preprocess import ImageError

    quiet_third_party_warnings()
    try:
        torch_ocr = LatexOCR(a.checkpoint, config=a.config, tokenizer=a.tokenizer, device="cpu",
                             precision="fp32")
    except Exception as e:
        print(f"pix2tex.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    try:
        export_onnx(torch_ocr, a.out, a.opset)
    except ValueError as e:  # a decoder the lean step does not cover
        print(f"pix2tex.export: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out}/encoder.onnx and decoder_step.onnx in {time.perf_counter() - t0:.1f} s")
    if a.check:
        onnx_ocr = LatexOCR(a.out, backend="onnx")
        differ = 0
        for path in a.check:
            try:
                page = torch_ocr.preprocess(path)
            except ImageError as e:
                print(f"pix2tex.export: skipping {e}", file=sys.stderr)
                continue
            same = torch_ocr.recognize([page]) == onnx_ocr.recognize([page])
            differ += not same
            print(f"{'same' if same else 'DIFFERENT'}: {path}")
        if differ:
            print(f"pix2tex.export: {differ} of {len(a.check)} images decode differently", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
