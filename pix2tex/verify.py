"""Render-and-compare: does a candidate's LaTeX, drawn by the project's renderer, draw the image?

    results = verify_pages([page], [["x ^ { 2 }", "x ^ { 3 }"]])   # pages: LatexOCR.preprocess output
    results[0] -> [(True, "its rendering at 110 dpi matches ..."), (False, "... differs ...")]

A candidate is drawn twice: first at `VERIFY_DPI`, whose ink box against the page's gives the
page's scale, then at that dpi and three either side (the estimate rounds), so that it is drawn
as the page's formula was. A drawing of the page's size is compared pixel by pixel (both binarized,
cropped to their ink, the drawing resized onto the page's ink box): it matches when no connected
group of `MAX_BLOB` or more pixels differs. The same formula drawn at the same dpi differs in
nothing or in scattered pixels; a changed symbol differs in a stroke. On 100 im2latex val formulas
drawn in Computer Modern at 100-130 dpi (and each with one symbol changed): 99 of the right
formulas verify and none of the changed ones. A page drawn by another renderer or font, or
resampled by preprocessing, rarely matches pixel for pixel: its answer stays unverified
(precision first). Candidates are drawn in the renderer's sandbox (dataset_tools.render: no
shell escape, paranoid file access, a time limit), in Computer Modern, in one latex run per call.
"""
from __future__ import annotations

import os
import statistics
import tempfile

import numpy as np
from PIL import Image

VERIFY_DPI = 115  # the first drawing: the middle of the training renders' 100-130 dpi
DPI_RANGE = (40, 600)  # page scales outside it are not drawn again (unverified)
MAX_BLOB = 3  # px: a connected difference this large is a changed symbol, not rounding
# dpi offsets around the estimated one that are drawn: the page's ink box is rounded to whole
# pixels, so a short formula's estimate can be 3 dpi off
SEARCH = (-3, -2, -1, 0, 1, 2, 3)


def render_candidates(formulas: list[str], dpi: int | list[int] = VERIFY_DPI,
                      timeout: float = 10.0) -> list[np.ndarray | None]:
    """Each formula drawn in Computer Modern at `dpi` (one for all, or one each; grayscale uint8,
    dark ink on white), or None where TeX rejected it (or timed out). One batched renderer call:
    one latex run, one dvipng run per distinct dpi."""
    from dataset_tools.render import render_formulas

    if not formulas:
        return []
    dpis = [dpi] * len(formulas) if isinstance(dpi, int) else list(dpi)
    with tempfile.TemporaryDirectory(prefix="pix2tex-verify-") as folder:
        result = render_formulas(list(formulas), folder, dpis=dpis, fonts=["cm"], patch_size=1,
                                 margin=2, workers=1, timeout=timeout, progress=False)
        out = []
        for i in range(len(formulas)):
            path = os.path.join(folder, f"{i:07d}.png")
            if i in result.rejected or not os.path.isfile(path):
                out.append(None)
            else:
                with Image.open(path) as img:
                    out.append(np.asarray(img.convert("L")))
        return out


def _ink_crop(gray: np.ndarray) -> np.ndarray | None:
    """`gray` cropped to its ink (value <= 128, as the image match binarizes), or None."""
    ink = gray <= 128
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not len(rows):
        return None
    return gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def ink_box(gray: np.ndarray) -> tuple[int, int] | None:
    """(height, width) of the ink, or None."""
    crop = _ink_crop(gray)
    return None if crop is None else crop.shape


def page_dpi(page: np.ndarray, renderings: list[np.ndarray | None]) -> int | None:
    """The dpi at which the candidates would be drawn at the page's scale (from the ratio of the
    ink boxes' heights and widths), or None if no candidate draws anything."""
    box = ink_box(page)
    ratios = []
    for r in renderings:
        theirs = None if r is None else ink_box(r)
        if box and theirs:  # mostly the width: more pixels, so less rounding
            ratios.append((box[0] + box[1]) / (theirs[0] + theirs[1]))
    if not ratios:
        return None
    dpi = int(round(VERIFY_DPI * statistics.median(ratios)))
    return dpi if DPI_RANGE[0] <= dpi <= DPI_RANGE[1] else None


def verify_pages(pages: list[np.ndarray], candidates: list[list[str]],
                 timeout: float = 10.0) -> list[list[tuple[bool, str]]]:
    """For each page (uint8, dark ink on white) and each of its candidate formulas: (match,
    reason). Two renderer calls: every candidate at VERIFY_DPI, then at the page's estimated dpi
    and the `SEARCH` ones around it."""
    from pix2tex.extras import require

    require("train", "verification (--verify)")  # scipy comes with it; the renderer needs TeX
    flat = [(p, f) for p, formulas in enumerate(candidates) for f in formulas]
    first = render_candidates([f for _, f in flat], VERIFY_DPI, timeout)
    per_page: list[list[np.ndarray | None]] = [[] for _ in pages]
    for (p, _), r in zip(flat, first):
        per_page[p].append(r)
    dpis = [page_dpi(page, rs) for page, rs in zip(pages, per_page)]
    again = [(i, dpis[p] + d) for i, (p, _) in enumerate(flat) if dpis[p] is not None
             for d in SEARCH]
    drawn = render_candidates([flat[i][1] for i, _ in again], [d for _, d in again], timeout)
    second: dict[int, list[tuple[int, np.ndarray | None]]] = {}
    for (i, d), r in zip(again, drawn):
        second.setdefault(i, []).append((d, r))
    out: list[list[tuple[bool, str]]] = [[] for _ in pages]
    for i, (p, _) in enumerate(flat):
        out[p].append(_compare(pages[p], first[i], second.get(i, []), dpis[p]))
    return out


def pixels_agree(page: np.ndarray, rendering: np.ndarray) -> tuple[bool, int]:
    """(match, size of the largest connected difference in px) of two drawings at one scale:
    both cropped to their ink and binarized, the rendering resized onto the page's ink box."""
    from scipy import ndimage

    a = _ink_crop(page)
    b = np.asarray(Image.fromarray(_ink_crop(rendering)).resize(
        (a.shape[1], a.shape[0]), Image.Resampling.LANCZOS))
    off = (a <= 128) != (b <= 128)
    if not off.any():
        return True, 0
    labels, _ = ndimage.label(off, structure=np.ones((3, 3), bool))
    largest = int(np.bincount(labels.ravel())[1:].max())
    return largest < MAX_BLOB, largest


def _compare(page, first, drawings, dpi) -> tuple[bool, str]:
    if first is None:
        return False, "the candidate does not render"
    box = ink_box(page)
    if box is None:
        return False, "the image has no ink"
    if dpi is None:
        return False, "the image's scale is out of range"
    closest = None
    for d, rendering in drawings:
        theirs = None if rendering is None else ink_box(rendering)
        if theirs is None:
            continue
        if abs(box[0] - theirs[0]) > 0.03 * box[0] + 2 or abs(box[1] - theirs[1]) > 0.03 * box[1] + 2:
            continue  # another shape: not this scale (or not this formula)
        ok, largest = pixels_agree(page, rendering)
        if ok:
            return True, f"its rendering at {d} dpi matches the image (largest difference {largest} px)"
        closest = largest if closest is None else min(closest, largest)
    if closest is None:
        return False, f"its rendering at {dpi} dpi has another shape than the image"
    return False, f"its rendering at {dpi} dpi differs from the image ({closest} px of ink in one place)"
