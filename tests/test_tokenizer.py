"""BPE tokenizer over LaTeX tokens: round trip on real formulas, token boundaries, special ids, files."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pix2tex.dataset.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, WORD_MARK, TokenizerError,
                                       load_tokenizer, read_formulas, train_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(shared_data):
    """Train on arXiv display formulas, test on the im2latex validation split (disjoint sets)."""
    with open(shared_data / "arxiv_display.norm.txt", encoding="utf-8") as f:
        train = [line.strip() for line in itertools.islice(f, 20000) if line.strip()]
    test = read_formulas([shared_data / "im2latex_val.norm.txt"])
    return train, test


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus[0], vocab_size=3000)


def test_round_trip_on_real_formulas(tok, corpus):
    train, test = corpus
    alphabet = set("".join(train))
    seen = [f for f in test if set(f.replace(" ", "")) <= alphabet]
    assert len(seen) > 0.95 * len(test)  # the arXiv alphabet covers nearly all of im2latex
    for f in seen:
        ids = tok.encode(f)
        assert UNK_ID not in ids, f
        assert tok.decode(ids) == " ".join(f.split()), f
    # The tokenizer's own training formulas, in a batch.
    assert tok.decode_batch(tok.encode_batch(train[:500])) == [" ".join(f.split()) for f in train[:500]]


def test_merges_never_cross_latex_tokens(tok, corpus):
    # Every vocabulary entry is a piece of one LaTeX token: the word mark can only come first.
    for piece in tok.tokenizer.get_vocab():
        assert WORD_MARK not in piece[1:], piece
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    assert len(merges) > 100  # BPE did merge (\frac, \left(, ... become single pieces)
    for left, right in (m.split(" ") if isinstance(m, str) else m for m in merges):
        assert not right.startswith(WORD_MARK), (left, right)
    # Pieces of encoded formulas regroup into exactly the formula's LaTeX tokens.
    for f in corpus[1][:2000]:
        words = []
        for piece in tok.tokens(f):
            if piece.startswith(WORD_MARK):
                words.append(piece[1:])
            else:
                words[-1] += piece
        assert words == f.split() or "[UNK]" in "".join(words), f
    # Frequent commands become one piece each.
    assert tok.tokens(r"\frac { a } { b }") == [WORD_MARK + t for t in r"\frac { a } { b }".split()]


def test_special_ids_and_vocab_size(corpus):
    small = train_tokenizer(corpus[0][:3000], vocab_size=300)
    assert len(small) == small.vocab_size == 300
    vocab = small.tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")] == [PAD_ID, BOS_ID, EOS_ID, UNK_ID] == [0, 1, 2, 3]
    big = train_tokenizer(corpus[0][:3000], vocab_size=100000)
    assert 300 < len(big) < 100000  # stops when no pair inside a LaTeX token is frequent enough
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=3)


def test_decode_skips_pad_bos_and_stops_at_eos(tok):
    ids = tok.encode(r"x ^ { 2 } + y")
    seq = [BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]
    assert tok.decode(seq) == r"x ^ { 2 } + y"
    assert tok.decode(torch.tensor(seq)) == r"x ^ { 2 } + y"
    assert tok.decode([BOS_ID, *ids[:3], EOS_ID, *ids[3:]]) == tok.decode(ids[:3])
    assert tok.decode_batch(torch.tensor([seq, [BOS_ID, *ids, EOS_ID, EOS_ID, EOS_ID]])) == [r"x ^ { 2 } + y"] * 2
    assert tok.decode([]) == ""
    # Whitespace in the input does not matter; encode adds no BOS/EOS.
    assert tok.encode("x  ^\t{ 2 }\n") == tok.encode("x ^ { 2 }")
    assert BOS_ID not in ids and EOS_ID not in ids


def test_unseen_character_is_unk(tok):
    ids = tok.encode("x + \u263a")
    assert UNK_ID in ids
    assert tok.decode(ids).startswith("x +")


def test_latex_ocr_tokenizer_loads_decodes_and_reports_what_it_drops(tmp_path):
    """LaTeX-OCR's tokenizer.json (byte-level BPE, no [UNK]), for running its weights here."""
    from pix2tex.dataset.dataset import unknown_labels

    latex_ocr = load_tokenizer(os.path.join(REPO, "pix2tex", "latex_ocr_tokenizer.json"))
    assert latex_ocr.unk_id is None and len(latex_ocr) == 1175
    f = r"\frac { a } { b } + x ^ { 2 } \alpha"
    ids = latex_ocr.encode(f)
    assert "Ġ{" in latex_ocr.tokens(f)  # its pieces, with the byte-level space mark
    assert latex_ocr.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == f
    # a character outside its vocabulary vanishes in encoding: counted as unknown, not lost unseen
    formulas = [f, f + " \u263a"]
    ids = [np.asarray(latex_ocr.encode(x)) for x in formulas]
    assert unknown_labels(latex_ocr, formulas, ids) == [False, True]


def test_save_load(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    assert sorted(os.listdir(path.parent)) == ["tokenizer.json"]  # no temporary file left
    again = load_tokenizer(path)
    f = r"\sum _ { i = 1 } ^ { n } \alpha _ { i } \left( x \right)"
    assert again.encode(f) == tok.encode(f) and len(again) == len(tok)
    assert again.path == str(path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_cli(corpus, tmp_path):
    data = tmp_path / "f.txt"
    data.write_text("\n".join(corpus[0][:1000]) + "\n", encoding="utf-8")
    out = tmp_path / "tok.json"
    res = subprocess.run([sys.executable, "-m", "pix2tex.dataset.tokenizer", "--data", str(data),
                          "--vocab-size", "250", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "250 tokens from 1000 formulas" in res.stdout
    assert len(load_tokenizer(out)) == 250
