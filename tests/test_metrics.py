"""Metric values on small hand-computed cases, and im2markup's image match with the real renderer."""
import math

import numpy as np
import pytest

from pix2tex import metrics as M

FRAC = r"\frac { a } { b } + c"  # 9 tokens, 11 characters without spaces


def test_identical_is_perfect():
    refs = [FRAC, "x ^ { 2 } + y ^ { 2 }"]
    out = M.compute_metrics(refs, refs)
    assert out["bleu"] == pytest.approx(1.0)
    assert out["edit_distance"] == 0.0
    assert out["token_edit_accuracy"] == 1.0
    assert out["token_accuracy"] == 1.0
    assert out["exact_match"] == 1.0
    assert out["n"] == 2 and "image_match" not in out


def test_empty_prediction_scores_zero():
    out = M.compute_metrics([""], ["x ^ { 2 }"])
    assert out["bleu"] == 0.0
    assert out["edit_distance"] == 1.0
    assert out["token_edit_accuracy"] == 0.0
    assert out["token_accuracy"] == 0.0
    assert out["exact_match"] == 0.0
    # Both empty: nothing differs.
    assert M.edit_distance("", "") == 0.0


def test_one_inserted_token():
    ref = "a + b = c"  # 5 tokens, 'a+b=c' 5 characters
    pred = "( a + b = c"  # '(' inserted in front: 6 tokens, 6 characters
    assert M.edit_distance(pred, ref) == pytest.approx(1 / 6)
    assert M.token_edit_accuracy([pred], [ref]) == pytest.approx(1 - 1 / 6)
    # Alignment-based: the 5 reference tokens are all matched (position-by-position would give 0).
    assert M.token_accuracy([pred], [ref]) == pytest.approx(5 / 6)
    assert M.exact_match([pred], [ref]) == 0.0


def test_corpus_sums_not_means():
    # token_edit_accuracy and token_accuracy pool counts over the corpus (im2markup), while
    # edit_distance averages per-sample ratios.
    preds, refs = ["a", "a b c d e f g h i"], ["b", "a b c d e f g h i"]
    assert M.token_edit_accuracy(preds, refs) == pytest.approx(1 - 1 / 10)
    assert M.token_accuracy(preds, refs) == pytest.approx(9 / 10)
    assert M.mean_edit_distance(preds, refs) == pytest.approx(0.5)


def test_known_bleu_value():
    # Hypothesis tokens: 6, reference tokens: 7. Matches: 1-grams 5/6, 2-grams 4/4, 3-grams 3/3,
    # 4-grams 2/2 ('x' has no n-grams above 1). BLEU = BP * (5/6)^(1/4), BP = exp(1 - 7/6).
    preds, refs = ["a b c d e", "x"], ["a b c d e f", "y"]
    expected = math.exp(1 - 7 / 6) * (5 / 6) ** 0.25
    assert M.bleu(preds, refs) == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(0.80876, abs=1e-5)
    # Longer hypothesis: no brevity penalty; 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3.
    assert M.bleu(["a b c d e z"], ["a b c d e"]) == pytest.approx(
        (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs=1e-9)


def test_whitespace_and_bleu_on_latex_tokens():
    # The character metric ignores spacing; token metrics split on whitespace (no extra tokenizer:
    # '\frac' stays one token, so changing it to '\dfrac' costs exactly one token).
    assert M.edit_distance("x ^ { 2 }", "x^{2}") == 0.0
    assert M.exact_match(["x  ^ { 2 }"], ["x ^ { 2 }"]) == 1.0
    pred = FRAC.replace(r"\frac", r"\dfrac")
    assert M.token_accuracy([pred], [FRAC]) == pytest.approx(8 / 9)
    # 1-grams 8/9, 2-grams 7/8, 3-grams 6/7, 4-grams 5/6 (only the first n-gram of each order differs).
    assert M.bleu([pred], [FRAC]) == pytest.approx((8 / 9 * 7 / 8 * 6 / 7 * 5 / 6) ** 0.25, abs=1e-9)


def test_length_buckets_breakdown():
    short, long_ = "a + b", " ".join(["x"] * 30)
    assert M.length_buckets([short, long_, " ".join(["y"] * 151), ""]) == ["0-25", "26-50", "151+", "0-25"]
    out = M.compute_metrics([short, "x"], [short, long_])
    assert list(out["by_length"]) == ["0-25", "26-50"]
    assert out["by_length"]["0-25"]["exact_match"] == 1.0 and out["by_length"]["0-25"]["n"] == 1
    assert out["by_length"]["26-50"]["token_accuracy"] == pytest.approx(1 / 30)


def test_multi_line_subset():
    """The formulas with rows (the reader issue's multi-line target) get their own scores."""
    rows = [r"\left( \begin{array} { c c } { a } & { b } \\ \end{array} \right)",
            r"f ( x ) = \left\{ \begin{cases} { 1 } \\ { 0 } \\ \end{cases} \right.",
            r"\begin{pmatrix} { x } \\ \end{pmatrix}", r"a \\ b"]
    single = ["a + b", r"\frac { a } { b }", r"\left( x \right)"]
    assert [M.is_multi_line(f) for f in rows + single] == [True] * 4 + [False] * 3
    out = M.compute_metrics(rows[:2] + single, [rows[0], "x"] + single)
    assert out["multi_line"]["n"] == 1 and out["multi_line"]["exact_match"] == 1.0
    assert "multi_line" not in M.compute_metrics(single, single)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.compute_metrics(["a", "b"], ["a"])


def _canvas(width, marks, height=20, left=3):
    """White image with black vertical bars at the given (start, width) columns."""
    img = np.full((height, width + 2 * left), 255, np.uint8)
    for start, w in marks:
        img[4:16, left + start:left + start + w] = 0
    return img


def test_images_match_column_rule():
    gold = _canvas(40, [(0, 6), (10, 6), (30, 6)])
    # Same ink at another offset and with other margins: cropping to the ink makes it equal.
    assert M.images_match(gold, _canvas(40, [(0, 6), (10, 6), (30, 6)], left=9, height=30))
    # A 3-column wider gap is a differing span below 5 columns: still a match.
    assert M.images_match(gold, _canvas(43, [(0, 6), (10, 6), (33, 6)]))
    # 6 extra ink columns in the prediction: no match (im2markup's gold-only span would accept it).
    assert not M.images_match(gold, _canvas(48, [(0, 6), (10, 6), (30, 6), (40, 6)]))
    assert not M.images_match(gold, None)
    # Without blank columns, a wide extra gap no longer differs.
    wide_gap = _canvas(60, [(0, 6), (10, 6), (50, 6)])
    assert not M.images_match(gold, wide_gap)
    assert M.images_match(gold, wide_gap, ignore_blank_columns=True)


def test_image_match_renders_equivalent_spellings_equal(tmp_path):
    preds = ["x ^ { 2 }", "x _ { 2 }", r"\frac { 1 } { 2 }", r"\undefinedmacro { x }", r"\nope { y }", "", "a"]
    refs = ["x ^ 2", "x ^ 2", r"\frac 1 2", "x", r"\nope  { y }", "", ""]
    # x^2 == x^{2}; x^2 != x_2; \frac12 == \frac{1}{2}; a prediction that does not render never
    # matches; identical tokens match without rendering (even when TeX rejects them); empty
    # matches only empty.
    got = M.image_match(preds, refs, render_dir=tmp_path, workers=1)
    assert got == [True, False, True, False, True, True, False]
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3  # only the 4 differing pairs were rendered
    with pytest.raises(ValueError, match="already holds files"):
        M.image_match(preds, refs, render_dir=tmp_path)
    out = M.compute_metrics(preds[:4], refs[:4], image_match=True, render_dir=str(tmp_path / "again"),
                            workers=1)
    assert out["image_match"] == pytest.approx(0.5)
    assert out["exact_match"] == 0.0
    assert out["by_length"]["0-25"]["image_match"] == pytest.approx(0.5)


def test_latex_ocr_bleu_is_its_eval_metric():
    from pix2tex.metrics import latex_ocr_bleu, latex_ocr_tokens, ngram_bleu

    # torchtext's formula: the same number as sacrebleu's corpus BLEU on plain tokens
    cands = ["a b c d e f", "x + y = z ^ { 2 }", "\\frac { a } { b }"]
    refs = ["a b c d e g", "x + y = z ^ { 3 }", "\\frac { a } { c }"]
    assert ngram_bleu([c.split() for c in cands], [r.split() for r in refs]) == \
        pytest.approx(M.bleu(cands, refs), abs=1e-9)
    assert ngram_bleu([["a", "b"]], [["a", "b"]]) == 0.0  # no 4-gram: torchtext's 0
    # LaTeX-OCR's byte-level pieces, with its space mark stripped
    toks = latex_ocr_tokens(["\\frac { a } { b }"])[0]
    assert "".join(toks) == "\\frac{a}{b}" and all("\u0120" not in t for t in toks)
    # the mean over batches, as its eval.py reports it
    good, bad = "\\frac { a } { b } + c ^ { 2 }", "y"
    assert latex_ocr_bleu([good, good], [good, good], batch_size=1) == pytest.approx(1.0)
    assert latex_ocr_bleu([good, bad], [good, good], batches=[[0], [1]]) == pytest.approx(0.5)
