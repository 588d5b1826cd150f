"""Checkpoints: LaTeX-OCR's weights files are recognized and refused with the reason; the encoder
half of one has our names and computes the same function (fixture made by
scripts/make_latex_ocr_fixture.py in the peer venv)."""
from pathlib import Path

import pytest
import torch

from pix2tex.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from pix2tex.config import load_config
from pix2tex.models import get_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "latex_ocr"


def test_latex_ocr_weights_are_refused_with_the_reason_and_its_encoder_is_ours():
    cfg = load_config(FIXTURES / "tiny_config.yaml")  # a LaTeX-OCR config (its keys)
    model = get_model(cfg).eval()
    with pytest.raises(CheckpointError, match=r"tiny_weights\.pth is a LaTeX-OCR weights file: "
                                              r"its decoder has 7 bias tensors"):
        load_model_weights(model, FIXTURES / "tiny_weights.pth")
    state = load_checkpoint(FIXTURES / "tiny_weights.pth")
    model.encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                                   if k.startswith("encoder.")})  # strict: names and shapes
    reference = torch.load(FIXTURES / "tiny_outputs.pth", weights_only=True)
    with torch.no_grad():
        memory = model.encode(reference["images"])
    torch.testing.assert_close(memory, reference["memory"], atol=1e-4, rtol=1e-4)


def test_newest_checkpoint_is_the_highest_step_not_the_newest_file(tmp_path):
    from pix2tex.checkpoint import newest_checkpoint, save_checkpoint

    assert newest_checkpoint(tmp_path / "none") is None
    save_checkpoint({"step": 7, "optimizer": {}}, tmp_path / "best.pth")
    save_checkpoint({"step": 7, "optimizer": {}}, tmp_path / "last.pth")
    save_checkpoint({"step": 3, "optimizer": {}}, tmp_path / "copy_of_an_old_one.pth")  # newest file
    save_checkpoint({"step": 9, "model": {}}, tmp_path / "release.pth")  # no optimizer state
    save_checkpoint({"model": {}}, tmp_path / "weights.pth")
    assert newest_checkpoint(tmp_path) == str(tmp_path / "last.pth")
    (tmp_path / "torn.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"torn\.pth: cannot be read"):
        newest_checkpoint(tmp_path)
