#!/usr/bin/env python
"""Render-and-compare verification (pix2tex/verify.py) without a model: does the right formula
verify against its own image, and does a formula with one symbol changed not?

Draws `--num` im2latex validation formulas (../shared/data/im2latex_val.norm.txt, up to 80 tokens,
a seeded sample) with the project's renderer at 100-130 dpi in each of `--fonts` (the input
images), changes one symbol of each (a digit, a letter or one of + - < > =, seeded), and verifies
both against the image. Prints one JSON object: per font, the share of right formulas that verify
(the coverage verification can reach) and of changed ones that verify (false verifications: the
target is 0), and the milliseconds per image for its two candidates.

    .venv/bin/python bench/verify.py [--num 100] [--fonts cm,mathptmx,...]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SYMBOLS = {"digit": "0123456789", "letter": "abcdefghknpqrsuvwxyz", "relation": "+-<>="}


def change_one_symbol(formula: str, rng: random.Random) -> str | None:
    """`formula` with one single-character symbol replaced by another of its kind (None: none)."""
    tokens = formula.split()
    where = [i for i, t in enumerate(tokens) if len(t) == 1 and any(t in s for s in SYMBOLS.values())]
    if not where:
        return None
    i = rng.choice(where)
    kind = next(s for s in SYMBOLS.values() if tokens[i] in s)
    tokens[i] = rng.choice([c for c in kind if c != tokens[i]])
    return " ".join(tokens)


def main() -> None:
    from dataset_tools.render import available_fonts, render_formulas
    from pix2tex.verify import verify_pages

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--fonts", help="fonts the input images are drawn in, comma-separated "
                                    "(default: every font the renderer has, those of the training renders)")
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"))
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    source = os.path.join(opts.shared, "im2latex_val.norm.txt")
    if not os.path.isfile(source):
        raise SystemExit(f"error: {source} not found (--shared FOLDER with the corpora)")
    rng = random.Random(opts.seed)
    with open(source, encoding="utf-8") as f:
        formulas = [line.strip() for line in f if 0 < len(line.split()) <= 80]
    rng.shuffle(formulas)
    pairs = [(f, changed) for f in formulas for changed in [change_one_symbol(f, rng)] if changed]
    pairs = pairs[:opts.num]
    report = {"bench": "verify", "formulas": len(pairs), "source": "im2latex_val.norm.txt",
              "input_dpi": [100, 130], "fonts": {}}
    for font in opts.fonts.split(",") if opts.fonts else available_fonts():
        with tempfile.TemporaryDirectory() as folder:
            drawn = render_formulas([f for f, _ in pairs], folder, dpi=(100, 130), fonts=[font],
                                    seed=opts.seed, progress=False)
            keep = sorted(drawn.rendered)
            pages = [np.asarray(Image.open(drawn.rendered[i]).convert("L")) for i in keep]
        t0 = time.perf_counter()
        results = verify_pages(pages, [[pairs[i][0], pairs[i][1]] for i in keep])
        ms = 1000 * (time.perf_counter() - t0) / max(len(keep), 1)
        right = [r[0][0] for r in results]
        changed = [r[1][0] for r in results]
        report["fonts"][font] = {
            "images": len(keep), "right_verified": round(float(np.mean(right)), 4),
            "changed_verified": round(float(np.mean(changed)), 4),
            "ms_per_image_2_candidates": round(ms, 1),
            "changed_that_verified": [pairs[keep[i]][1] for i, ok in enumerate(changed) if ok][:5]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
