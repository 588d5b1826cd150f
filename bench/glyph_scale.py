"""Glyph-scale estimator of pix2tex/preprocess.py on TeX renders of known resolution.

    .venv/bin/python bench/glyph_scale.py [--data FILE] [--limit 300] [--dpi 58 86 115 ... 460]

Renders the first `limit` im2latex validation formulas (never the test split) with the training
renderer at each dpi, in every font, then measures `glyph_height` of each image (after
`crop_to_ink`, as preprocessing sees it). 115 dpi is the middle of the training renders, so
dpi / 115 is the true scale. Prints one JSON object: per dpi the median glyph height and its
spread over formulas, the estimated scale against the true one (median ratio, shares within 10%
and 20%), the scale the model then sees after `normalize_scale` (10th/50th/90th percentile), and
`glyph_height_at_115_dpi`, the value behind `preprocess.TRAIN_GLYPH_HEIGHT`.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset_tools.render import read_formulas, render_formulas  # noqa: E402
from pix2tex.preprocess import SCALE_BAND, TRAIN_GLYPH_HEIGHT, crop_to_ink, glyph_height  # noqa: E402

TRAIN_DPI = 115


def measure(formulas: list[str], dpi: int, workers: int) -> list[float]:
    """glyph_height of every formula rendered at `dpi` (formulas with too few glyphs left out)."""
    with tempfile.TemporaryDirectory(prefix="bench-glyph-") as out:
        res = render_formulas(formulas, out, dpi=dpi, workers=workers, progress=False)
        heights = []
        for path in res.rendered.values():
            crop = crop_to_ink(np.asarray(Image.open(path).convert("L")))
            h = None if crop is None else glyph_height(crop)
            if h is not None:
                heights.append(h)
    return heights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "im2latex_val.norm.txt"))
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--dpi", type=int, nargs="+", default=[58, 86, 115, 144, 173, 230, 345, 460])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    formulas = read_formulas(args.data)[:args.limit]
    report = {"formulas": len(formulas), "train_glyph_height": TRAIN_GLYPH_HEIGHT,
              "band": list(SCALE_BAND), "by_dpi": {}}
    for dpi in args.dpi:
        heights = np.asarray(measure(formulas, dpi, args.workers))
        true = dpi / TRAIN_DPI
        est = heights / TRAIN_GLYPH_HEIGHT
        ratio = est / true
        # the scale the model then sees: the input's (estimate in the band: left as it is) or,
        # resized by 1/estimate, true / estimate
        after = np.where((est >= SCALE_BAND[0]) & (est <= SCALE_BAND[1]), true, true / est)
        report["by_dpi"][str(dpi)] = {
            "true_scale": round(true, 3), "measured": len(heights),
            "glyph_height_median": float(np.median(heights)),
            "glyph_height_p10_p90": [float(np.percentile(heights, 10)), float(np.percentile(heights, 90))],
            "estimate_over_true_median": round(float(np.median(ratio)), 3),
            "within_10pct": round(float(np.mean(np.abs(ratio - 1) <= 0.10)), 3),
            "within_20pct": round(float(np.mean(np.abs(ratio - 1) <= 0.20)), 3),
            "scale_after_normalization_p10_p50_p90": [round(float(np.percentile(after, q)), 3)
                                                       for q in (10, 50, 90)],
        }
        if dpi == TRAIN_DPI:
            report["glyph_height_at_115_dpi"] = float(np.median(heights))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
