"""bench/screenshots.py's renderers: KaTeX and MathJax in headless Chromium draw a formula at the
asked scale, and a formula they cannot draw is reported as an error, not a blank image."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("screenshots", REPO / "bench" / "screenshots.py")
screenshots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshots)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(screenshots.MATHJAX) / "tex-svg-full.js").is_file():
        pytest.fail(f"MathJax missing at {screenshots.MATHJAX}: run `bash scripts/setup.sh` (npm install)")
    b = screenshots.Browser(str(tmp_path_factory.mktemp("shots")))
    yield b
    b.close()


def ink_height(path) -> int:
    a = np.asarray(Image.open(path).convert("L")) < 128
    rows = np.flatnonzero(a.any(1))
    return int(rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("kind, settings", [("katex", (1, 2)), ("mathjax", (20, 40))])
def test_draws_at_the_asked_scale_and_reports_what_it_cannot_draw(browser, tmp_path, kind, settings):
    formulas = [r"\frac { a ^ { 2 } } { b + c }", r"\frac { a", r"\int _ { 0 } ^ { 1 } x d x"]
    heights = []
    for s in settings:
        drawn, errors = screenshots.draw_browser(browser, formulas, str(tmp_path / f"{kind}{s}"), kind, s)
        assert set(drawn) == {0, 2} and set(errors) == {1}, errors
        # one copy of the formula: MathJax's assistive MathML would draw a second one
        assert browser.driver.execute_script(
            "return document.querySelectorAll('#box mjx-assistive-mml').length") == 0
        heights.append(ink_height(drawn[0]))
    assert 1.8 < heights[1] / heights[0] < 2.2, heights  # twice the scale: twice the glyphs
