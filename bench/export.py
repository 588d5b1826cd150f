#!/usr/bin/env python
"""CPU latency of the two inference backends: PyTorch (`Model.generate`) and the ONNX export run
with onnxruntime (`pix2tex.onnx_model.OnnxModel`), greedy decoding, one image at a time.

Two models: the tiny one of bench/serve.py (trained here; decodes its 8 rendered formulas to
EOS), and the default architecture of settings/config.yaml (25M parameters, random weights,
so every image decodes to --max-len tokens: the decoder's cost per token at full size). Both
backends must give the same token ids (reported); PyTorch is timed in float32 and, where the CPU
has fast bf16 (AMX / AVX512-BF16), in bf16 too. Prints one JSON object.

    .venv/bin/python bench/export.py [--threads 2] [--repeats 3] [--max-len 64]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pages_of(images, cfg):
    """Preprocessed, normalized [1, 1, H, W] arrays of the images for this model's geometry."""
    from pix2tex.dataset.transforms import MEAN, STD
    from pix2tex.preprocess import Geometry, preprocess

    geo = Geometry.from_config(cfg)
    return [((preprocess(p, geo).astype(np.float32) / 255 - MEAN) / STD)[None, None] for p in images]


def timed(fn, inputs, repeats):
    """Per-input latency (ms): the best of `repeats` runs of each input, after one warm-up."""
    out = [fn(x) for x in inputs]  # warm-up (and the ids)
    best = [min(_time(fn, x) for _ in range(repeats)) for x in inputs]
    return out, {"median_ms": round(1000 * statistics.median(best), 1),
                 "mean_ms": round(1000 * statistics.fmean(best), 1)}


def _time(fn, x):
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def compare(name, model, cfg, images, workdir, opts, tokenizer=None):
    import torch

    from pix2tex.export import export_model
    from pix2tex.models.model import cpu_has_fast_bf16
    from pix2tex.onnx_model import OnnxModel

    folder = os.path.join(workdir, f"onnx-{name}")
    t0 = time.perf_counter()
    export_model(model, cfg, folder, tokenizer)
    export_s = time.perf_counter() - t0
    onnx = OnnxModel(folder, threads=opts.threads)
    inputs = pages_of(images, cfg)
    result = {"export_s": round(export_s, 1), "images": len(inputs),
              "sizes": sorted({f"{x.shape[2]}x{x.shape[3]}" for x in inputs})}

    def torch_fn(precision):
        return lambda x: model.generate(torch.from_numpy(x), max_len=opts.max_len,
                                        precision=precision).numpy()

    ids_torch, result["torch_fp32"] = timed(torch_fn("fp32"), inputs, opts.repeats)
    ids_onnx, result["onnx_fp32"] = timed(lambda x: onnx.generate(x, max_len=opts.max_len),
                                          inputs, opts.repeats)
    if cpu_has_fast_bf16():
        _, result["torch_bf16"] = timed(torch_fn("bf16"), inputs, opts.repeats)
    result["tokens_mean"] = round(statistics.fmean(int((i != cfg.pad_token).sum()) for i in ids_torch), 1)
    result["ids_equal"] = all(np.array_equal(a, b) for a, b in zip(ids_torch, ids_onnx))
    result["onnx_speedup_vs_torch_fp32"] = round(result["torch_fp32"]["median_ms"]
                                                 / result["onnx_fp32"]["median_ms"], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pix2tex-bench-serve"))
    opts = ap.parse_args()
    os.makedirs(opts.workdir, exist_ok=True)

    import torch

    from pix2tex.config import load_config
    from pix2tex.models import get_model
    from pix2tex.predict import LatexOCR
    from serve import tiny_checkpoint

    ckpt, images = tiny_checkpoint(opts.workdir)
    torch.set_num_threads(opts.threads)
    tiny = LatexOCR(ckpt, device="cpu")
    out = {"bench": "export", "threads": opts.threads, "cpus": os.cpu_count(),
           "load_average_1min": None, "max_len": opts.max_len}
    log("tiny model ...")
    out["tiny"] = compare("tiny", tiny.model, tiny.cfg, images, opts.workdir, opts, tiny.tokenizer.path)
    log("default architecture ...")
    cfg = load_config(os.path.join(REPO, "settings", "config.yaml"), ["inference_precision=fp32"])
    torch.manual_seed(0)
    model = get_model(cfg).eval()
    out["default"] = compare("default", model, cfg, images, opts.workdir, opts)
    out["default"]["parameters"] = sum(p.numel() for p in model.parameters())
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
