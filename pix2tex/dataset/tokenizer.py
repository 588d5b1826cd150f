"""BPE over LaTeX tokens with the `tokenizers` library.

Formulas arrive normalized: LaTeX tokens separated by single spaces (`\\frac { a } { b }`). The
Metaspace pre-tokenizer turns each space-separated LaTeX token into one "word" that starts with
`▁`, so BPE merges stay inside a LaTeX token (`\\fr` + `ac` may merge, `{` + `a` never does), and
the Metaspace decoder puts back exactly one space between LaTeX tokens. Every character is its own
alphabet symbol (the word marker is a separate symbol), so any formula made of characters seen in
training encodes without `[UNK]` and decodes to itself.

Special tokens: [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3. `encode` adds no BOS/EOS; the dataset does.

LaTeX-OCR's tokenizer.json (a byte-level BPE: [PAD], [BOS], [EOS] at 0-2 and no [UNK]; a character
outside its vocabulary is dropped, which the dataset counts as unknown) loads too, for its weights.
It decodes with the byte-level decoder (LaTeX-OCR's `token2str` joined its pieces and turned `Ġ`
into spaces), whitespace collapsed as for ours.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Sequence

from pix2tex.fileio import atomic_write_text
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # their position in this list is their id
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
WORD_MARK = "\u2581"  # `▁`, starts every LaTeX token inside the BPE model


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # Any run of whitespace is one LaTeX token boundary; leading/trailing blanks mean nothing.
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=WORD_MARK, prepend_scheme="always", split=True)
    return tok


class LatexTokenizer:
    """A trained BPE tokenizer for normalized LaTeX. `path` is the file it was loaded from or saved to."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, tokenizer: Tokenizer, path: str | None = None):
        byte_level = isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)
        # a byte-level BPE (LaTeX-OCR's) may have no [UNK]
        need = SPECIAL_TOKENS[:3] if byte_level and tokenizer.token_to_id(UNK) is None else SPECIAL_TOKENS
        for i, name in enumerate(need):
            if tokenizer.token_to_id(name) != i:
                raise TokenizerError(f"{path or 'tokenizer'}: special token {name} must have id {i}, "
                                     f"has {tokenizer.token_to_id(name)}; retrain it with "
                                     f"`python -m pix2tex.dataset.tokenizer`")
        if byte_level and tokenizer.decoder is None:
            tokenizer.decoder = decoders.ByteLevel()
        self.tokenizer = tokenizer
        self.path = path
        self.unk_id: int | None = tokenizer.token_to_id(UNK)  # None: unknown characters vanish

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, formula: str) -> list[int]:
        """Token ids of one formula, without BOS/EOS."""
        return self.tokenizer.encode(formula, add_special_tokens=False).ids

    def encode_batch(self, formulas: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(formulas), add_special_tokens=False)]

    def tokens(self, formula: str) -> list[str]:
        """The BPE pieces of a formula (for inspection and tests)."""
        return self.tokenizer.encode(formula, add_special_tokens=False).tokens

    def _clean(self, ids: Iterable[int]) -> list[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The normalized formula of a sequence: PAD/BOS skipped, stops at EOS, tokens joined by
        single spaces. Accepts lists, tuples, numpy arrays and 1-d tensors."""
        text = self.tokenizer.decode(self._clean(ids), skip_special_tokens=False)
        return " ".join(text.split())

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        texts = self.tokenizer.decode_batch([self._clean(ids) for ids in batch], skip_special_tokens=False)
        return [" ".join(t.split()) for t in texts]

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON through a temporary file and a rename (never a torn file)."""
        path = os.fspath(path)
        atomic_write_text(path, self.tokenizer.to_str(pretty=True))
        self.path = os.path.abspath(path)


def train_tokenizer(formulas: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
                    show_progress: bool = False) -> LatexTokenizer:
    """Train BPE on normalized formulas. `vocab_size` counts the special tokens and the alphabet;
    with few distinct pieces the vocabulary may end smaller."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small; it must exceed the "
                         f"{len(SPECIAL_TOKENS)} special tokens")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=show_progress)
    tok.train_from_iterator((f for f in formulas if f.strip()), trainer=trainer)
    return LatexTokenizer(tok)


def load_tokenizer(path: str | os.PathLike) -> LatexTokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file not found: {path} (build one with "
                             f"`python -m pix2tex.dataset.tokenizer --data FORMULAS.txt --out {path}`)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a plain Exception for malformed JSON
        raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from None
    return LatexTokenizer(tok, os.path.abspath(path))


def read_formulas(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Non-empty lines of the given formula files."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out.extend(line.strip() for line in f if line.strip())
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the BPE tokenizer on normalized formula files.")
    ap.add_argument("--data", nargs="+", required=True, help="formula files, one formula a line")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--out", default="tokenizer.json")
    args = ap.parse_args(argv)
    try:
        formulas = read_formulas(args.data)
    except OSError as e:
        raise SystemExit(f"error: {e}")
    if not formulas:
        raise SystemExit(f"error: no formulas in {' '.join(args.data)}")
    tok = train_tokenizer(formulas, args.vocab_size, args.min_frequency, show_progress=True)
    tok.save(args.out)
    print(f"tokenizer: {len(tok)} tokens from {len(formulas)} formulas -> {args.out}")


if __name__ == "__main__":
    main()
