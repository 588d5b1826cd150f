#!/usr/bin/env python
"""`pix2tex FOLDER` speed: images per second of the command line on a folder of real formula images.

    .venv/bin/python bench/folder.py [--images 300] [--source data/im2latex_val/images/test]
        [--checkpoint models/pix2tex.pth] [--threads 2]

Copies `--images` PNGs of `--source` (a seeded sample; by default the im2latex val formulas that
scripts/quality.sh renders at 100-130 dpi, of mixed sizes) into a temporary folder and runs the
real command, `pix2tex FOLDER --format json`, in a fresh process: with no --checkpoint the shipped
model as the CLI picks it (the released ONNX graphs), with one its backend (a .pth: torch, in its
default inference precision). The start-up (imports, loading the model) is timed on a folder of
one image and subtracted, so images/s is the reading rate a long folder sees.

Prints one JSON object: images, seconds for the folder and for start-up, images per second and
the target (30 images/s).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 30.0


def run_cli(folder: str, checkpoint: str | None, threads: int) -> tuple[float, list[dict]]:
    """(wall seconds, JSON rows) of `pix2tex folder --format json` in a fresh process."""
    cmd = [sys.executable, "-m", "pix2tex.predict", folder, "--format", "json"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"pix2tex failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--source", default=os.path.join(REPO, "data", "im2latex_val", "images", "test"),
                   help="folder of formula images (default: what scripts/quality.sh renders)")
    p.add_argument("--checkpoint", help="a .pth or ONNX folder (default: the shipped model as the "
                                        "CLI picks it)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    if not os.path.isdir(args.source):
        raise SystemExit(f"{args.source} not found: render it with `./create_data.sh "
                         f"--test-formulas ../shared/data/im2latex_val.norm.txt --tokenizer "
                         f"models/tokenizer.json --out data/im2latex_val` (or pass --source)")
    names = sorted(f for f in os.listdir(args.source) if f.endswith(".png"))
    if len(names) < args.images:
        raise SystemExit(f"{args.source} holds {len(names)} PNGs, fewer than --images {args.images}")
    picks = random.Random(0).sample(names, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder, one = os.path.join(tmp, "folder"), os.path.join(tmp, "one")
        os.makedirs(folder)
        os.makedirs(one)
        for name in picks:
            shutil.copy(os.path.join(args.source, name), folder)
        shutil.copy(os.path.join(args.source, picks[0]), one)
        startup, _ = run_cli(one, args.checkpoint, args.threads)
        seconds, rows = run_cli(folder, args.checkpoint, args.threads)
    if len(rows) != args.images:
        raise SystemExit(f"pix2tex answered {len(rows)} of {args.images} images")
    rate = (args.images - 1) / max(seconds - startup, 1e-9)
    print(json.dumps({
        "images": args.images, "source": args.source,
        "model": args.checkpoint or "shipped (the CLI's default)", "threads": args.threads,
        "seconds": round(seconds, 2), "startup_seconds": round(startup, 2),
        "images_per_second": round(rate, 2), "target_images_per_second": TARGET,
        "met": rate >= TARGET,
    }, indent=1))


if __name__ == "__main__":
    main()
