"""Metrics of formula recognition, shared by train (validation), eval and distill.

Predictions and references are normalized LaTeX strings: tokens separated by spaces
(`\\frac { a } { b }`). "Tokens" below are these LaTeX tokens (`s.split()`), never BPE pieces.

- `bleu`: corpus BLEU-4 (sacrebleu, `tokenize='none'`, no smoothing: standard Papineni BLEU over
  the space-separated LaTeX tokens), in [0, 1].
- `edit_distance`: character-level Levenshtein distance between the two strings with all
  whitespace removed, divided by the longer of the two lengths (0 when both are empty); per
  sample, then averaged. Lower is better.
- `token_edit_accuracy`: im2markup's "edit distance accuracy",
  1 - sum(Levenshtein(pred tokens, ref tokens)) / sum(max(len(pred tokens), len(ref tokens))).
- `token_accuracy`: alignment-based, so that one inserted token does not shift every later one:
  sum(LCS(pred tokens, ref tokens)) / sum(max(len(pred tokens), len(ref tokens))), where LCS is the
  length of the longest common subsequence (the tokens an optimal alignment matches). Dividing by
  the longer length penalizes extra tokens as well as missing ones.
- `exact_match`: fraction of samples whose token sequences are identical.
- `image_match`: im2markup's image accuracy: both formulas rendered by the project's renderer at one
  fixed dpi and font, see `images_match`. Equivalent spellings (`x^2`, `x^{2}`) count as correct.
- `by_length`: the same metrics per bucket of reference length in tokens.
- `multi_line`: the same metrics on the references with rows (`array`, `matrix`, `cases`,
  `aligned`, or a `\\\\` row break), the structures printed formulas have that single-line
  training formulas lack; absent when there are none.
- `latex_ocr_bleu` (eval.py): BLEU as LaTeX-OCR's eval.py reports it (its 0.88), for a like-for-like
  comparison: torchtext's BLEU-4 on LaTeX-OCR's own tokenizer pieces, per evaluation batch, then
  the mean over batches (`latex_ocr_bleu`).

This module does not import torch; image match imports the renderer only when it is used.
"""
from __future__ import annotations

import bisect
import os
import re
import tempfile
from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import LCSseq, Levenshtein

# Reference-length buckets (tokens) of the `by_length` breakdown: (0, 25], (25, 50], ...
LENGTH_EDGES = (25, 50, 75, 100, 150)


def _check_pair(preds: Sequence[str], refs: Sequence[str]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references; they must pair up")


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] over space-separated LaTeX tokens (no extra tokenization)."""
    import sacrebleu  # imported here: keeps `import pix2tex.metrics` cheap

    _check_pair(preds, refs)
    if not preds:
        return 0.0
    # sacrebleu splits on whitespace with tokenize='none'; an empty prediction simply has no n-grams.
    score = sacrebleu.corpus_bleu(list(preds), [list(refs)], tokenize="none", smooth_method="none",
                                  force=True)  # input is tokenized on purpose: no "detokenize" warning
    return score.score / 100.0


# LaTeX-OCR's tokenizer: pix2tex 0.1.4's model/dataset/tokenizer.json (LaTeX-OCR, MIT license,
# Lukas Blecher), a byte-level BPE. Its BLEU is computed on these pieces.
LATEX_OCR_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "latex_ocr_tokenizer.json")


def latex_ocr_tokens(formulas: Sequence[str], tokenizer_file: str = LATEX_OCR_TOKENIZER
                     ) -> list[list[str]]:
    """The tokens LaTeX-OCR's eval.py scores: its BPE pieces with the byte-level space mark 'Ġ'
    turned into a space and stripped (a piece that was only a space stays, as an empty token)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    return [[piece.replace("\u0120", " ").strip() for piece in e.tokens]
            for e in tok.encode_batch(list(formulas), add_special_tokens=False)]


def ngram_bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
               max_n: int = 4) -> float:
    """Corpus BLEU-4 of token lists, one reference each, as torchtext.data.metrics.bleu_score
    (LaTeX-OCR's): clipped n-gram precisions with uniform weights, brevity penalty, 0 when any
    order has no match."""
    from collections import Counter

    clipped, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        cand_len, ref_len = cand_len + len(cand), ref_len + len(ref)
        for n in range(1, max_n + 1):
            c = Counter(tuple(cand[i:i + n]) for i in range(len(cand) - n + 1))
            r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            clipped[n - 1] += sum((c & r).values())
            total[n - 1] += max(len(cand) - n + 1, 0)
    if min(clipped) == 0:
        return 0.0
    log_p = sum(np.log(c / t) for c, t in zip(clipped, total)) / max_n
    return float(np.exp(log_p) * np.exp(min(1 - ref_len / cand_len, 0)))


def latex_ocr_bleu(preds: Sequence[str], refs: Sequence[str],
                   batches: Sequence[Sequence[int]] | None = None, batch_size: int = 20,
                   tokenizer_file: str = LATEX_OCR_TOKENIZER) -> float:
    """BLEU as LaTeX-OCR's eval.py computes it: `ngram_bleu` on its tokenizer's pieces of each
    batch (`batches`: lists of positions in preds/refs; default: consecutive runs of
    `batch_size`), then the mean over batches."""
    _check_pair(preds, refs)
    if not preds:
        return 0.0
    if batches is None:
        batches = [range(s, min(s + batch_size, len(preds))) for s in range(0, len(preds), batch_size)]
    tokens = latex_ocr_tokens([*preds, *refs], tokenizer_file)  # one tokenizer load
    p_tok, r_tok = tokens[:len(preds)], tokens[len(preds):]
    scores = [ngram_bleu([p_tok[i] for i in b], [r_tok[i] for i in b]) for b in batches if len(b)]
    return float(np.mean(scores))


def _strip(s: str) -> str:
    return "".join(s.split())


def edit_distance(pred: str, ref: str) -> float:
    """Levenshtein distance of the whitespace-free strings over the longer length, in [0, 1]."""
    a, b = _strip(pred), _strip(ref)
    longest = max(len(a), len(b))
    return Levenshtein.distance(a, b) / longest if longest else 0.0


def mean_edit_distance(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Per-sample normalized character edit distance, averaged over samples."""
    _check_pair(preds, refs)
    return float(np.mean([edit_distance(p, r) for p, r in zip(preds, refs)])) if preds else 0.0


def token_edit_accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """im2markup: 1 - sum of token Levenshtein distances / sum of the longer token lengths."""
    _check_pair(preds, refs)
    dist = total = 0
    for p, r in zip(preds, refs):
        pt, rt = p.split(), r.split()
        dist += Levenshtein.distance(pt, rt)
        total += max(len(pt), len(rt))
    return 1.0 - dist / total if total else 1.0


def token_accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Tokens matched by an optimal alignment (longest common subsequence), summed over the
    corpus, over the summed longer token lengths. One inserted token costs one token, not all
    that follow it (as position-by-position comparison would)."""
    _check_pair(preds, refs)
    matched = total = 0
    for p, r in zip(preds, refs):
        pt, rt = p.split(), r.split()
        matched += LCSseq.similarity(pt, rt)
        total += max(len(pt), len(rt))
    return matched / total if total else 1.0


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of samples whose LaTeX token sequences are identical."""
    _check_pair(preds, refs)
    return float(np.mean([p.split() == r.split() for p, r in zip(preds, refs)])) if preds else 0.0


# --- image match (im2markup's scripts/evaluation/evaluate_image.py) ------------------------

def _ink_columns(gray: np.ndarray) -> np.ndarray:
    """Binarize (ink = value <= 128, as im2markup) and crop to the ink's bounding box, as
    im2markup's renderer crops; returns [W, H] (one row per image column)."""
    ink = np.asarray(gray) <= 128
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if not len(rows):
        return np.zeros((0, 0), dtype=np.uint8)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].T.astype(np.uint8)


def _symbols(a: np.ndarray, b: np.ndarray, tol: int) -> tuple[list[int], list[int]]:
    """Give each column a symbol; a column within `tol` differing pixels of one seen before
    shares its symbol (im2markup's tolerance to anti-aliasing noise)."""
    seen: list[np.ndarray] = []
    cache: dict[bytes, int] = {}

    def symbol(col: np.ndarray) -> int:
        key = col.tobytes()
        if key not in cache:
            if seen:
                diff = np.abs(np.stack(seen).astype(np.int16) - col).sum(1)
                close = np.flatnonzero(diff < tol)
                if len(close):
                    cache[key] = int(close[0])
                    return cache[key]
            cache[key] = len(seen)
            seen.append(col)
        return cache[key]

    return [symbol(c) for c in a], [symbol(c) for c in b]


def images_match(gold: np.ndarray | None, pred: np.ndarray | None, *, ignore_blank_columns: bool = False,
                 min_span: int = 5, tol: int = 5) -> bool:
    """im2markup's image match of two grayscale images (dark ink on light background).

    Both are binarized and cropped to their ink; the shorter is padded at the bottom to the same
    height; each column becomes a symbol (columns within `tol` pixels of each other are the same
    symbol); the two column sequences are aligned with Levenshtein opcodes, and the images match
    unless some differing span is `min_span` columns or wider. im2markup measures only the span's
    width in the gold image, so any insertion in the prediction passes; here the span is the
    wider of the two sides, so extra symbols in the prediction are caught too.
    `ignore_blank_columns=True` drops all-white columns first (im2markup's "w/o spaces").
    A missing prediction (`None`: it failed to render) never matches.
    """
    if gold is None or pred is None:
        return False
    a, b = _ink_columns(gold), _ink_columns(pred)
    height = max(a.shape[1], b.shape[1])
    a = np.pad(a, ((0, 0), (0, height - a.shape[1])))
    b = np.pad(b, ((0, 0), (0, height - b.shape[1])))
    if ignore_blank_columns:
        a, b = a[a.any(1)], b[b.any(1)]
    if a.shape == b.shape and np.array_equal(a, b):
        return True
    sa, sb = _symbols(a, b, tol)
    for op in Levenshtein.opcodes(sa, sb):
        if op.tag != "equal" and max(op.src_end - op.src_start, op.dest_end - op.dest_start) >= min_span:
            return False
    return True


def _load_gray(path: str | None) -> np.ndarray | None:
    from PIL import Image

    if path is None or not os.path.isfile(path):
        return None
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# One fixed rendering for both sides, so identical glyph sequences give identical pixels; 200 dpi
# as im2markup's `convert -density 200`.
IMAGE_MATCH_DPI = 200
IMAGE_MATCH_FONT = "cm"


def image_match(preds: Sequence[str], refs: Sequence[str], *, render_dir: str | os.PathLike | None = None,
                workers: int | None = None, ignore_blank_columns: bool = False,
                progress: bool = False) -> list[bool]:
    """Per pair: do prediction and reference render to the same image (`images_match`)?

    Both are rendered by `dataset_tools.render` in one font at one dpi. Pairs with identical token
    sequences match without rendering, so image match is never below exact match. A prediction
    that does not render is a non-match; a reference that does not render (or an empty one)
    matches only an identical prediction. Renders go to `render_dir` (`gold/`, `pred/`; must not
    hold earlier renders, which the renderer would reuse) or to a temporary folder.
    """
    from dataset_tools.render import render_formulas

    _check_pair(preds, refs)
    out = [p.split() == r.split() for p, r in zip(preds, refs)]
    todo = [i for i, same in enumerate(out) if not same and refs[i].strip() and preds[i].strip()]
    if not todo:
        return out
    with tempfile.TemporaryDirectory(prefix="pix2tex-imagematch-") as tmp:
        root = os.fspath(render_dir) if render_dir is not None else tmp
        for side in ("gold", "pred"):
            folder = os.path.join(root, side)
            if os.path.isdir(folder) and os.listdir(folder):
                raise ValueError(f"image match: {folder} already holds files; give an empty render_dir")
        kwargs = dict(dpi=(IMAGE_MATCH_DPI, IMAGE_MATCH_DPI), fonts=[IMAGE_MATCH_FONT], workers=workers,
                      progress=progress)
        gold = render_formulas([refs[i] for i in todo], os.path.join(root, "gold"), **kwargs)
        pred = render_formulas([preds[i] for i in todo], os.path.join(root, "pred"), **kwargs)
        for k, i in enumerate(todo):
            out[i] = images_match(_load_gray(gold.rendered.get(k)), _load_gray(pred.rendered.get(k)),
                                  ignore_blank_columns=ignore_blank_columns)
    return out


_image_match = image_match  # compute_metrics' `image_match` flag shadows the function


# --- everything at once ---------------------------------------------------------------------

def bucket_labels(edges: Sequence[int] = LENGTH_EDGES) -> list[str]:
    """Labels of the reference-length buckets, shortest first: '0-25', '26-50', ..., '151+'."""
    inner = [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])]
    return [f"0-{edges[0]}", *inner, f"{edges[-1] + 1}+"]


def length_buckets(refs: Sequence[str], edges: Sequence[int] = LENGTH_EDGES) -> list[str]:
    """The bucket label of each reference by its length in LaTeX tokens."""
    labels = bucket_labels(edges)
    return [labels[bisect.bisect_left(edges, len(r.split()))] for r in refs]


def _corpus_metrics(preds: Sequence[str], refs: Sequence[str], matches: Sequence[bool] | None) -> dict:
    out = {
        "bleu": bleu(preds, refs),
        "edit_distance": mean_edit_distance(preds, refs),
        "token_edit_accuracy": token_edit_accuracy(preds, refs),
        "token_accuracy": token_accuracy(preds, refs),
        "exact_match": exact_match(preds, refs),
    }
    if matches is not None:
        out["image_match"] = float(np.mean(matches)) if len(matches) else 0.0
    out["n"] = len(preds)
    return out


def compute_metrics(preds: Sequence[str], refs: Sequence[str], image_match: bool = False, *,
                    image_matches: Sequence[bool] | None = None, render_dir: str | None = None,
                    workers: int | None = None) -> dict:
    """All metrics of the module docstring for paired lists of normalized formulas.

    Returns `bleu`, `edit_distance`, `token_edit_accuracy`, `token_accuracy`, `exact_match`,
    (`image_match` when `image_match=True` or per-sample `image_matches` are given), `n`, and
    `by_length`: {bucket label: the same metrics on that bucket}.
    """
    _check_pair(preds, refs)
    preds, refs = list(preds), list(refs)
    matches = None
    if image_matches is not None:
        if len(image_matches) != len(preds):
            raise ValueError(f"{len(image_matches)} image matches for {len(preds)} predictions")
        matches = list(image_matches)
    elif image_match:
        matches = _image_match(preds, refs, render_dir=render_dir, workers=workers)
    out = _corpus_metrics(preds, refs, matches)
    buckets: dict[str, list[int]] = {}
    for i, label in enumerate(length_buckets(refs)):
        buckets.setdefault(label, []).append(i)
    order = bucket_labels()
    def subset(idx: list[int]) -> dict:
        return _corpus_metrics([preds[i] for i in idx], [refs[i] for i in idx],
                               None if matches is None else [matches[i] for i in idx])

    out["by_length"] = {label: subset(idx) for label, idx in
                        sorted(buckets.items(), key=lambda kv: order.index(kv[0]))}
    rows = [i for i, r in enumerate(refs) if is_multi_line(r)]
    if rows:
        out["multi_line"] = subset(rows)
    return out


MULTI_LINE = re.compile(r"\\begin\{(?:array|[pbvBV]?matrix|cases|aligned)\}|\\\\")


def is_multi_line(formula: str) -> bool:
    """A formula with rows: an array, matrix, cases or aligned environment, or a `\\\\` break."""
    return MULTI_LINE.search(formula) is not None
