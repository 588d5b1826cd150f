"""Shared test fixtures."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real formula corpora in ../shared/data. Absent means a broken checkout: fail, never skip."""
    if not (SHARED_DATA / "im2latex_val.norm.txt").is_file():
        pytest.fail(f"real formula corpora missing: expected {SHARED_DATA} (the ../shared folder "
                    f"beside the repo); these tests need real formulas and must not be skipped")
    return SHARED_DATA


@dataclass(frozen=True)
class TinyData:
    """A tiny real dataset: synthetic formulas rendered with TeX, a BPE tokenizer, train/val pkls."""
    dir: Path
    train_pkl: Path
    val_pkl: Path
    tokenizer: Path
    formulas: Path  # train formulas, line i <-> train_images/{i:07d}.png
    val_formulas: Path
    train_images: Path
    val_images: Path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """~64 short synthetic formulas rendered once per session (a few seconds), 48 train / 16 val."""
    from dataset_tools.render import render_formulas
    from dataset_tools.synth import SynthConfig, generate
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    formulas = generate(64, seed=1, config=SynthConfig(mean_tokens=12.0, max_tokens=30, max_depth=2))
    splits = {"train": formulas[:48], "val": formulas[48:]}
    tok = train_tokenizer(splits["train"], vocab_size=300)
    tok.save(root / "tokenizer.json")
    for name, lines in splits.items():
        (root / f"{name}.txt").write_text("".join(f + "\n" for f in lines), encoding="utf-8")
        render_formulas(lines, root / "images" / name, dpi=(110, 130), seed=0, progress=False,
                        rejects_path=root / f"rejects_{name}.txt")
        ds = Im2LatexDataset.build(root / "images" / name, root / f"{name}.txt", root / "tokenizer.json",
                                   batchsize=4)
        if len(ds.samples) < len(lines) - 2 or ds.report.kept < len(lines) // 2:
            pytest.fail(f"tiny_data {name}: too few usable renders: {ds.report.summary()}")
        ds.save(root / f"{name}.pkl")
    return TinyData(dir=root, train_pkl=root / "train.pkl", val_pkl=root / "val.pkl",
                    tokenizer=root / "tokenizer.json", formulas=root / "train.txt",
                    val_formulas=root / "val.txt", train_images=root / "images" / "train",
                    val_images=root / "images" / "val")
