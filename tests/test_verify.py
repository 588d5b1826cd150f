"""Render-and-compare verification: with real TeX, a right candidate verifies and a one-symbol change
does not; bad candidates and blank images give an unverified answer with the reason."""
import json

import numpy as np
import pytest
from PIL import Image

from pix2tex.verify import render_candidates, verify_pages

FORMULAS = [r"\frac { a + b } { c ^ { 2 } } = \sum _ { i = 1 } ^ { n } x _ { i }",
            r"E = m c ^ { 2 }",
            r"\int _ { 0 } ^ { \infty } e ^ { - x ^ { 2 } } d x = \frac { \sqrt { \pi } } { 2 }"]
CHANGED = [r"\frac { a + b } { c ^ { 3 } } = \sum _ { i = 1 } ^ { n } x _ { i }",  # 2 -> 3
           r"E = m c ^ { 3 }",
           r"\int _ { 0 } ^ { \infty } e ^ { - x ^ { 2 } } d y = \frac { \sqrt { \pi } } { 2 }"]


def pages_at(dpi: int) -> list[np.ndarray]:
    """The formulas as an input image: drawn by the renderer at `dpi`, with a white margin."""
    return [np.pad(page, 12, constant_values=255) for page in render_candidates(FORMULAS, dpi)]


@pytest.mark.parametrize("dpi", [100, 120, 135])
def test_the_right_formula_verifies_and_a_one_symbol_change_does_not(dpi):
    results = verify_pages(pages_at(dpi), [[right, changed] for right, changed in zip(FORMULAS, CHANGED)])
    for (right, why), (changed, why_changed) in results:
        assert right, why
        assert not changed, why_changed
        assert "differs" in why_changed or "another shape" in why_changed


@pytest.mark.parametrize("font", ["mathptmx", "euler"])
def test_a_page_in_another_training_font_verifies_in_that_font(font):
    """The reader trains on six fonts: a right formula drawn in Times or Euler verifies (drawn in
    the page's font), a one-symbol change does not."""
    pages = [np.pad(page, 12, constant_values=255)
             for page in render_candidates(FORMULAS, 118, font=font)]
    results = verify_pages(pages, [[right, changed] for right, changed in zip(FORMULAS, CHANGED)])
    for (right, why), (changed, why_changed) in results:
        assert right and f"in {font} at" in why, why
        assert not changed, why_changed


def test_bad_candidates_and_blank_images_are_unverified_with_the_reason():
    page = pages_at(110)[1]
    blank = np.full((40, 120), 255, np.uint8)
    results = verify_pages([page, blank], [
        [r"\frac { a", r"\def \x { \x } \x", "", FORMULAS[1]],  # TeX error, runaway macro, empty
        [FORMULAS[1]]])
    reasons = [why for _, why in results[0]]
    assert [ok for ok, _ in results[0]] == [False, False, False, True]
    assert all("does not render" in why for why in reasons[:3]), reasons
    assert results[1] == [(False, "the image has no ink")]


def test_the_api_and_the_cli_say_whether_the_answer_verified(tiny_model, capsys):
    from pix2tex.predict import LatexOCR, main

    ocr = LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1, verify=True)
    pages, crops = zip(*(ocr.preprocess(p, keep_crop=True) for p in tiny_model.images[:4]))
    readings = ocr.read(list(pages), crops=list(crops))
    assert all(isinstance(r.verified, bool) for r in readings)
    assert [r.latex for r in readings] == ocr.batch(tiny_model.images[:4])  # the API keeps the crops
    # a verified answer is one of the beam's candidates, and its drawing matches: check it again
    for crop, reading in zip(crops, readings):
        if reading.verified:
            assert verify_pages([crop], [[reading.latex]])[0][0][0]
    plain = LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1)
    assert all(r.verified is None for r in plain.read(pages))
    main([str(tiny_model.images[0]), "--checkpoint", str(tiny_model.checkpoint), "--verify",
          "-f", "json"])
    row = json.loads(capsys.readouterr().out)
    assert row["verified"] == readings[0].verified and row["latex"] == readings[0].latex


@pytest.mark.parametrize("dpi", [80, 230, 345])
def test_an_image_that_preprocessing_resizes_verifies_against_its_ink_at_its_own_scale(dpi):
    """A TeX formula drawn at 0.7x, 2x or 3x the training scale (a HiDPI screenshot or a zoomed
    PDF of a TeX document) is resized by preprocessing; verification compares with the image's ink
    at its own scale (preprocess's crop), where the right formula's drawing matches and a
    one-symbol change's does not."""
    from pix2tex.preprocess import SCALE_BAND, estimate_scale, preprocess

    images = pages_at(dpi)
    prepared = [preprocess(image, keep_crop=True) for image in images]
    for (page, crop), image in zip(prepared, images):
        assert not SCALE_BAND[0] <= estimate_scale(crop) <= SCALE_BAND[1]  # the page is resized
        assert np.abs(np.subtract(crop.shape, ink_shape(image))).max() <= 2  # the crop is not
    results = verify_pages([crop for _, crop in prepared],
                           [[right, changed] for right, changed in zip(FORMULAS, CHANGED)])
    for (right, why), (changed, why_changed) in results:
        assert right, why
        assert not changed, why_changed


def ink_shape(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero((image < 255).any(1)), np.flatnonzero((image < 255).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
