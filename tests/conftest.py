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


@dataclass(frozen=True)
class TinyModel:
    """A tiny ViT model trained (~300 steps, 10-20 s) to memorize 8 formulas of `tiny_data`: its
    greedy outputs depend on the image and differ in length, yet it is no OCR model."""
    checkpoint: Path  # last.pth: weights, config, tokenizer path
    images: tuple  # the 8 rendered training images (PNG paths) it has memorized
    formulas: tuple  # their labels
    data: TinyData


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> TinyModel:
    import shutil

    import torch

    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.train import train

    root = tmp_path_factory.mktemp("tiny_model")
    (root / "images").mkdir()
    formulas = tiny_data.formulas.read_text(encoding="utf-8").splitlines()[:8]
    for i in range(len(formulas)):
        shutil.copy(tiny_data.train_images / f"{i:07d}.png", root / "images" / f"{i:07d}.png")
    (root / "train.txt").write_text("".join(f + "\n" for f in formulas), encoding="utf-8")
    ds = Im2LatexDataset.build(root / "images", root / "train.txt", tiny_data.tokenizer, batchsize=8)
    ds.save(root / "train.pkl")
    cfg = load_config(None, [
        f"data={root / 'train.pkl'}", f"tokenizer={tiny_data.tokenizer}", f"model_path={root}",
        "name=run", "encoder_structure=vit", "max_height=64", "max_width=256", "dim=64",
        "encoder_depth=1", "num_layers=2", "heads=4", "num_tokens=300", "max_seq_len=64",
        "batchsize=8", "max_steps=300", "epochs=100000", "optimizer.lr=3e-3", "sample_freq=100000",
        "device=cpu", "seed=0", "inference_precision=fp32"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and immune to a busy machine
    try:
        summary = train(cfg, train_data=Im2LatexDataset.load(root / "train.pkl").update(
            keep_smaller_batches=True))
    finally:
        torch.set_num_threads(threads)
    return TinyModel(checkpoint=Path(summary["run_dir"]) / "last.pth",
                     images=tuple(sorted((root / "images").glob("*.png"))), formulas=tuple(formulas),
                     data=tiny_data)


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    """Modules that run tiny models on one thread (LatexOCR(threads=1) sets it for the whole
    process) must not leave it so for the modules after them."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@dataclass
class HybridBatch:
    """A tiny hybrid model (2-layer decoder) in training mode and one random batch."""
    model: object
    images: object
    tgt: object

    def bf16_step(self):
        """One bf16-autocast loss and backward from zero gradients: (loss, gradients flattened)."""
        import torch

        self.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.model(self.images, self.tgt)
        loss.backward()
        grads = [p.grad.flatten() for p in self.model.parameters() if p.grad is not None]
        return loss.item(), torch.cat(grads)


@pytest.fixture
def hybrid_batch() -> HybridBatch:
    import torch

    from pix2tex.config import load_config
    from pix2tex.models import get_model

    cfg = load_config(REPO / "settings" / "config-tiny.yaml", [
        "max_height=64", "max_width=128", "num_tokens=40", "dim=64", "num_layers=2", "heads=4",
        "encoder_heads=4", "encoder_depth=1"])
    torch.manual_seed(0)
    model = get_model(cfg).train()
    images = torch.randn(2, 1, 64, 128)
    tgt = torch.randint(3, 40, (2, 14))
    tgt[:, 0], tgt[:, -1] = 1, 2
    return HybridBatch(model, images, tgt)
