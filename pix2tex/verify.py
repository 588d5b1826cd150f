"""Render-and-compare: does a candidate's LaTeX, drawn by the project's renderer, draw the image?

    results = verify_pages([crop], [["x ^ { 2 }", "x ^ { 3 }"]])  # crop: preprocess(.., keep_crop=True)[1]
    results[0] -> [(True, "its rendering in cm at 110 dpi matches ..."), (False, "... differs ...")]

A candidate is drawn first at `VERIFY_DPI` (at a page drawn much larger, its glyph scale times
that), whose ink box against the page's gives the page's scale; then at that dpi and one either
side, and where those drawings did not reach the page's ink box on one side (the estimate rounds:
a short formula's can be 3 dpi off), at two more dpi on that side, so that it is drawn as the
page's formula was. The training renders (and so the reader) use six font packages: the first
drawing of a page's best candidate is made in each of them, and the font whose drawing, brought
onto the page's ink box, is most like the page's ink (and any about as like: a short formula can
look alike in two) is the one all its candidates are drawn in after that.
A drawing of the page's size is compared pixel by pixel (both binarized, cropped to their ink,
the drawing resized onto the page's ink box): it matches when no connected group of `MAX_BLOB`
or more pixels differs. The same formula drawn at the same dpi differs in nothing or in
scattered pixels; a changed symbol differs in a stroke. On 100 im2latex val formulas drawn in
each of the six fonts at 100-130 dpi, each also with one symbol changed (bench/verify.py):
97-99 of the right formulas verify in every font, and 0-3 of the changed ones (a stroke of a
few pixels: a subscript 0 -> 9). The page must be the image at the scale it was drawn: `LatexOCR`
passes the image's ink crop, before preprocessing resizes it. A resampled copy, or a page drawn
by another renderer, rarely matches pixel for pixel: its answer stays unverified (precision
first). Candidates are drawn in the renderer's sandbox (dataset_tools.render: no shell escape,
paranoid file access, a time limit), all pages' at once (`LatexOCR.read` verifies all the pages
it reads together): the renderer's start-up, one latex run per font and core and one dvipng run
per dpi, is paid once per call, not per page.
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
# dpi offsets around the estimated one that are drawn first: the page's ink box is rounded to
# whole pixels, so the estimate is off by one for a third of formulas and a short formula's by up
# to 3; FAR more dpi are drawn on a side the first drawings did not reach (`_beyond`)
NEAR = (-1, 0, 1)
FAR = 2
FONT_BLUR = 2.0  # px: the blur under which font shapes are compared (ink_likeness)
FONT_MARGIN = 0.02  # fonts this close to the likest one are tried too


def render_candidates(formulas: list[str], dpi: int | list[int] = VERIFY_DPI,
                      timeout: float = 10.0, font: str | list[str] = "cm") -> list[np.ndarray | None]:
    """Each formula drawn in `font` (a dataset_tools.render font; one for all, or one each) at
    `dpi` (one for all, or one each; grayscale uint8, dark ink on white, `as_ink`), or None where TeX
    rejected it (or timed out). One batched renderer call: one latex run per font and core (on
    the cores at once), one dvipng run per distinct dpi in each."""
    from dataset_tools.render import render_formulas

    if not formulas:
        return []
    dpis = [dpi] * len(formulas) if isinstance(dpi, int) else list(dpi)
    fonts = [font] * len(formulas) if isinstance(font, str) else list(font)
    with tempfile.TemporaryDirectory(prefix="pix2tex-verify-") as folder:
        result = render_formulas(list(formulas), folder, dpis=dpis, font_each=fonts, patch_size=1,
                                 margin=2, workers=os.cpu_count() or 1,
                                 timeout=timeout, progress=False)
        out = []
        for i in range(len(formulas)):
            path = os.path.join(folder, f"{i:07d}.png")
            if i in result.rejected or not os.path.isfile(path):
                out.append(None)
            else:
                with Image.open(path) as img:
                    out.append(as_ink(np.asarray(img.convert("L"))))
        return out


def as_ink(gray: np.ndarray) -> np.ndarray:
    """`gray` as preprocessing brings an image's ink (`crop_to_ink`: cropped, contrast stretched
    so the darkest pixel is black), or as it is when it has no ink. Pages and drawings both go
    through it: thin strokes drawn at a low dpi never reach black, and an image stretched by
    preprocessing then binarizes as a drawing stretched alike, not as the raw drawing."""
    from pix2tex.preprocess import crop_to_ink

    crop = crop_to_ink(gray)
    return gray if crop is None else crop


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


def first_dpi(page: np.ndarray) -> int:
    """The dpi of a page's first drawings: VERIFY_DPI, or for a page whose glyphs are drawn much
    larger than the training renders' (a HiDPI screenshot, a zoomed PDF: a scale preprocessing
    would shrink), that scale times VERIFY_DPI, so that the ink boxes that `page_dpi` compares are
    of about one size (the rounding of a small drawing's box, carried to a large page, would put
    the estimate many dpi off). Never smaller: the glyph scale of a short formula can read 40%
    low, and a small drawing's shapes tell the fonts apart less well."""
    from pix2tex.preprocess import SCALE_BAND, estimate_scale

    scale = estimate_scale(page)
    if scale is None or scale <= SCALE_BAND[1]:
        return VERIFY_DPI
    return int(min(round(VERIFY_DPI * scale), DPI_RANGE[1]))


def page_dpi(page: np.ndarray, renderings: list[np.ndarray | None],
             drawn_at: int = VERIFY_DPI) -> int | None:
    """The dpi at which the candidates (drawn at `drawn_at`) would be drawn at the page's scale
    (from the ratio of the ink boxes' heights and widths), or None if no candidate draws anything."""
    box = ink_box(page)
    ratios = []
    for r in renderings:
        theirs = None if r is None else ink_box(r)
        if box and theirs:  # mostly the width: more pixels, so less rounding
            ratios.append((box[0] + box[1]) / (theirs[0] + theirs[1]))
    if not ratios:
        return None
    dpi = int(round(drawn_at * statistics.median(ratios)))
    return dpi if DPI_RANGE[0] <= dpi <= DPI_RANGE[1] else None


def _onto_page_box(page: np.ndarray, drawing: np.ndarray | None):
    """(page's ink crop, the drawing's ink crop resized onto it), or None when either has no ink."""
    a = _ink_crop(page)
    b = None if drawing is None else _ink_crop(drawing)
    if a is None or b is None:
        return None
    return a, np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.LANCZOS))


def ink_likeness(page: np.ndarray, drawing: np.ndarray | None) -> float:
    """How alike two drawings' shapes are, whatever their scale: the correlation of the two inks,
    the drawing resized onto the page's ink box and both blurred (`FONT_BLUR` px), so that
    strokes a pixel apart still agree while another font's letter shapes do not (1 alike, 0 not
    at all; 0 when either has no ink). It picks the font of 95-100% of im2latex val formulas
    drawn in each of the renderer's six fonts at 100-130 dpi, where the overlap of the sharp
    inks picked 82-95%."""
    from PIL import ImageFilter

    both = _onto_page_box(page, drawing)
    if both is None:
        return 0.0
    inks = []
    for crop in both:
        blurred = Image.fromarray(crop).filter(ImageFilter.GaussianBlur(FONT_BLUR))
        ink = 255.0 - np.asarray(blurred, np.float32)
        inks.append(ink - ink.mean())
    norm = float(np.sqrt((inks[0] ** 2).sum() * (inks[1] ** 2).sum()))
    return float((inks[0] * inks[1]).sum()) / norm if norm > 0 else 0.0


def verify_pages(pages: list[np.ndarray], candidates: list[list[str]], timeout: float = 10.0,
                 fonts: list[str] | None = None) -> list[list[tuple[bool, str]]]:
    """For each page (uint8, dark ink on white, at the scale it was drawn: an image's ink crop,
    not a resized copy) and each of its candidate formulas: (match, reason). fonts: those a page
    may be drawn in (default: every font the renderer has here).
    Three renderer calls. First every candidate in Computer Modern at VERIFY_DPI (`first_dpi`: or
    at the page's glyph scale times that, where preprocessing would shrink it) and each page's
    first candidate in the other fonts: the page's fonts are those whose drawing of it is about
    as like the page's ink as the likest one's (`ink_likeness`, within FONT_MARGIN: a short
    formula can look alike in two fonts). Then every candidate in each of its page's fonts at
    the page's scale in that font and the `NEAR` dpi around it, and last `FAR` more dpi on a side
    those drawings did not reach (`_beyond`)."""
    from pix2tex.extras import require

    require("train", "verification (--verify)")  # scipy comes with it; the renderer needs TeX
    from dataset_tools.render import available_fonts

    fonts = list(fonts or available_fonts())
    pages = [as_ink(page) for page in pages]
    flat = [(p, f) for p, formulas in enumerate(candidates) for f in formulas]
    # every candidate in Computer Modern, and each page's best one in every other font
    tops = [(p, font) for p, formulas in enumerate(candidates) if formulas
            for font in fonts if font != "cm"]
    at = [first_dpi(page) for page in pages]
    drawn = render_candidates([f for _, f in flat] + [candidates[p][0] for p, _ in tops],
                              [at[p] for p, _ in flat] + [at[p] for p, _ in tops], timeout,
                              ["cm"] * len(flat) + [font for _, font in tops])
    first = drawn[:len(flat)]
    per_page: list[list[np.ndarray | None]] = [[] for _ in pages]
    for (p, _), r in zip(flat, first):
        per_page[p].append(r)
    in_font: list[dict[str, np.ndarray | None]] = [{} for _ in pages]  # the best candidate's
    for p, rs in enumerate(per_page):
        if rs and "cm" in fonts:
            in_font[p]["cm"] = rs[0]
    for (p, font), r in zip(tops, drawn[len(flat):]):
        in_font[p][font] = r
    # page -> [(font, dpi)]: the fonts it may be drawn in, each with the page's scale in it
    scales: list[list[tuple[str, int | None]]] = []
    for p, page in enumerate(pages):
        likeness = {font: ink_likeness(page, r) for font, r in in_font[p].items()}
        best = max(likeness.values(), default=0.0)
        near = [f for f in fonts if f in likeness and best > 0 and likeness[f] >= best - FONT_MARGIN]
        # the scale from every candidate's drawing in Computer Modern, or the best one's in another font
        scales.append([(f, page_dpi(page, per_page[p] if f == "cm" else [in_font[p][f]], at[p]))
                       for f in near or ["cm"]])
    second: dict[int, list[tuple[str, int, np.ndarray | None]]] = {}

    def draw(wanted: list[tuple[int, str, int]]) -> None:  # [(candidate, font, dpi)]
        wanted = [(i, font, d) for i, font, d in wanted if DPI_RANGE[0] <= d <= DPI_RANGE[1]]
        made = render_candidates([flat[i][1] for i, _, _ in wanted], [d for _, _, d in wanted],
                                 timeout, [font for _, font, _ in wanted])
        for (i, font, d), r in zip(wanted, made):
            second.setdefault(i, []).append((font, d, r))

    draw([(i, font, dpi + d) for i, (p, _) in enumerate(flat) for font, dpi in scales[p]
          if dpi is not None for d in NEAR])
    draw(_beyond(pages, flat, second))
    out: list[list[tuple[bool, str]]] = [[] for _ in pages]
    for i, (p, _) in enumerate(flat):
        out[p].append(_compare(pages[p], first[i], second.get(i, []), scales[p]))
    return out


def _beyond(pages, flat, drawings) -> list[tuple[int, str, int]]:
    """(candidate, font, dpi) to draw next: `FAR` more dpi above a candidate's drawings in a font
    when the largest of them is nowhere larger than the page's ink box (the page's dpi may lie
    above), and below when the smallest is nowhere smaller; not when they already bracket it."""
    out = []
    for i, made in drawings.items():
        box = ink_box(pages[flat[i][0]])
        if box is None:
            continue
        by_font: dict[str, list[tuple[int, tuple[int, int]]]] = {}
        for font, d, r in made:
            theirs = None if r is None else ink_box(r)
            if theirs is not None:
                by_font.setdefault(font, []).append((d, theirs))
        for font, boxes in by_font.items():
            (lo, small), (hi, large) = min(boxes), max(boxes)
            if large[0] <= box[0] and large[1] <= box[1]:
                out += [(i, font, hi + d) for d in range(1, FAR + 1)]
            if small[0] >= box[0] and small[1] >= box[1]:
                out += [(i, font, lo - d) for d in range(1, FAR + 1)]
    return out


def pixels_agree(page: np.ndarray, rendering: np.ndarray) -> tuple[bool, int]:
    """(match, size of the largest connected difference in px) of two drawings at one scale:
    both cropped to their ink and binarized, the rendering resized onto the page's ink box."""
    from scipy import ndimage

    a, b = _onto_page_box(page, rendering)
    off = (a <= 128) != (b <= 128)
    if not off.any():
        return True, 0
    labels, _ = ndimage.label(off, structure=np.ones((3, 3), bool))
    largest = int(np.bincount(labels.ravel())[1:].max())
    return largest < MAX_BLOB, largest


def _compare(page, first, drawings, scales) -> tuple[bool, str]:
    """(match, reason) of one candidate: its drawings [(font, dpi, image)] against the page;
    scales: the page's [(font, estimated dpi)]."""
    if first is None and not any(r is not None for _, _, r in drawings):
        return False, "the candidate does not render"
    box = ink_box(page)
    if box is None:
        return False, "the image has no ink"
    if all(dpi is None for _, dpi in scales):
        return False, "the image's scale is out of range"
    closest = None  # (largest difference in px, font)
    for font, d, rendering in drawings:
        theirs = None if rendering is None else ink_box(rendering)
        if theirs is None:
            continue
        if abs(box[0] - theirs[0]) > 0.03 * box[0] + 2 or abs(box[1] - theirs[1]) > 0.03 * box[1] + 2:
            continue  # another shape: not this scale (or not this formula)
        ok, largest = pixels_agree(page, rendering)
        if ok:
            return True, (f"its rendering in {font} at {d} dpi matches the image (largest "
                          f"difference {largest} px)")
        closest = min(closest or (largest, font), (largest, font))
    where = " or ".join(f"{font} at {dpi} dpi" for font, dpi in scales if dpi is not None)
    if closest is None:
        return False, f"its rendering in {where} has another shape than the image"
    return False, (f"its rendering in {where} differs from the image ({closest[0]} px of ink in "
                   f"one place, in {closest[1]})")
