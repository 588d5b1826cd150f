"""Turn a training checkpoint into a release: weights in bf16 (or fp16/fp32), the config, and the
tokenizer beside it, with none of the optimizer/RNG state a resume needs; and the same model as
ONNX graphs, for installs without torch.

    python -m pix2tex.release --checkpoint checkpoints/pix2tex-cpu/best.pth --out models \
        --onnx-out pix2tex/released

writes models/pix2tex.pth and models/tokenizer.json (the torch weights) and pix2tex/released/ (the
ONNX graphs with their tokenizer, package data: what the CLI, the API and the service read with
when no checkpoint is given). The torch model upcasts the weights to float32 on load; the ONNX
graphs store them in bf16 too (`export.store_exact_bf16`) and compute in float32, so both
backends decode the same ids in float32. `--onnx-out` defaults to OUT/<name>-onnx.
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import argparse
import os
import shutil

import torch

from pix2tex.checkpoint import (CheckpointError, check_compatible, load_checkpoint, model_state,
                                save_checkpoint)
from pix2tex.fileio import atomic_open, file_sha256, replace_folder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_release(checkpoint: str, out_dir: str, tokenizer: str | None = None, dtype: str = "bf16",
                 name: str = "pix2tex.pth", onnx_dir: str | None = None) -> dict:
    """Write out_dir/name and out_dir/tokenizer.json, and the ONNX graphs to `onnx_dir` unless it
    is "" (None: out_dir/<name>-onnx); returns what was written and its size."""
    from pix2tex.predict import resolve_tokenizer

    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{checkpoint} holds no config (a bare weights file): a release needs "
                              f"the training checkpoint (best.pth / last.pth)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tok_src = resolve_tokenizer([tokenizer, ckpt.get("tokenizer"), ckpt["config"].get("tokenizer")],
                                checkpoint)
    tok_sha = file_sha256(tok_src)
    check_compatible(ckpt, ckpt["config"], tok_sha, checkpoint)  # --tokenizer must be its own
    weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
               for k, v in model_state(ckpt).items()}
    # the config without paths of the machine it was trained on: the tokenizer sits beside it
    config = {**ckpt["config"], "tokenizer": None, "data": None, "valdata": None, "testdata": None,
              "load_ckpt": None}
    release = {"model": weights, "config": config, "tokenizer": None, "tokenizer_sha256": tok_sha,
               **{k: ckpt[k] for k in ("epoch", "step", "best") if k in ckpt},
               "released_from": os.path.basename(checkpoint), "weights_dtype": dtype}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    tok_dst = os.path.join(out_dir, "tokenizer.json")
    if os.path.abspath(tok_src) != os.path.abspath(tok_dst):
        with open(tok_src, "rb") as src, atomic_open(tok_dst, "wb") as dst:
            shutil.copyfileobj(src, dst)
    save_checkpoint(release, path)
    info = {"model": path, "tokenizer": tok_dst, "bytes": os.path.getsize(path), "dtype": dtype,
            "parameters": sum(v.numel() for v in weights.values() if v.is_floating_point())}
    if onnx_dir != "":
        onnx_dir = onnx_dir or os.path.join(out_dir, os.path.splitext(name)[0] + "-onnx")
        info["onnx"] = release_onnx(path, onnx_dir)
    return info


def release_onnx(release: str, onnx_dir: str) -> dict:
    """The ONNX folder of a written release (graphs, tokenizer, metadata), replacing `onnx_dir`
    whole once it is complete."""
    from pix2tex.export import export_onnx, store_exact_bf16
    from pix2tex.predict import LatexOCR

    ocr = LatexOCR(release, backend="torch", device="cpu", precision="fp32")
    tmp = os.path.normpath(onnx_dir) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_onnx(ocr, tmp)
    for graph in ("encoder.onnx", "decoder_step.onnx"):
        store_exact_bf16(os.path.join(tmp, graph))
    replace_folder(tmp, onnx_dir)
    return {"folder": onnx_dir, "bytes": sum(os.path.getsize(os.path.join(onnx_dir, f))
                                             for f in os.listdir(onnx_dir))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pix2tex.release", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (best.pth / last.pth)")
    p.add_argument("--out", default="models", help="output folder (default: models)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the checkpoint names)")
    p.add_argument("--name", default="pix2tex.pth",
                   help="file name of the weights in OUT (default pix2tex.pth; the distilled "
                        "student's: pix2tex-small.pth)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights dtype (default bf16)")
    p.add_argument("--onnx-out", help="folder for the ONNX graphs (default: OUT/<name>-onnx; the "
                                      "shipped model's: pix2tex/released)")
    p.add_argument("--no-onnx", action="store_true", help="write the torch weights only")
    args = p.parse_args(argv)
    try:
        info = make_release(args.checkpoint, args.out, args.tokenizer, args.dtype, name=args.name,
                            onnx_dir="" if args.no_onnx else args.onnx_out)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {info['model']} ({info['bytes'] / 2**20:.1f} MiB, {info['parameters']:,} "
          f"parameters in {info['dtype']}) and {info['tokenizer']}")
    if "onnx" in info:
        print(f"wrote {info['onnx']['folder']} ({info['onnx']['bytes'] / 2**20:.1f} MiB of ONNX graphs)")


if __name__ == "__main__":
    main()
