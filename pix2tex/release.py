"""Turn a training checkpoint into a release: weights in bf16 (or fp16/fp32), the config, and the
tokenizer beside it, with none of the optimizer/RNG state a resume needs.

    python -m pix2tex.release --checkpoint checkpoints/pix2tex-cpu/best.pth --out models

writes models/pix2tex.pth and models/tokenizer.json (the default model the CLI, the API and the
service load when no checkpoint is given). The model upcasts the weights to float32 on load.
"""
from __future__ import annotations

import argparse
import os
import shutil

import torch

from pix2tex.checkpoint import (CheckpointError, check_compatible, load_checkpoint, model_state,
                                save_checkpoint)
from pix2tex.fileio import atomic_open, file_sha256

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_release(checkpoint: str, out_dir: str, tokenizer: str | None = None, dtype: str = "bf16",
                 name: str = "pix2tex.pth") -> dict:
    """Write out_dir/name and out_dir/tokenizer.json; returns what was written and its size."""
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
    return {"model": path, "tokenizer": tok_dst, "bytes": os.path.getsize(path), "dtype": dtype,
            "parameters": sum(v.numel() for v in weights.values() if v.is_floating_point())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pix2tex.release", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint (best.pth / last.pth)")
    p.add_argument("--out", default="models", help="output folder (default: models)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the checkpoint names)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights dtype (default bf16)")
    args = p.parse_args(argv)
    try:
        info = make_release(args.checkpoint, args.out, args.tokenizer, args.dtype)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {info['model']} ({info['bytes'] / 2**20:.1f} MiB, {info['parameters']:,} "
          f"parameters in {info['dtype']}) and {info['tokenizer']}")


if __name__ == "__main__":
    main()
