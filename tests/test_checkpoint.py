"""Checkpoints: LaTeX-OCR's weights files load with LaTeX-OCR's outputs (fixture made by
scripts/make_latex_ocr_fixture.py in the peer venv); the newest checkpoint is chosen by step."""
from pathlib import Path

import pytest
import torch

from pix2tex.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from pix2tex.config import load_config
from pix2tex.models import get_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "latex_ocr"


def test_latex_ocr_weights_load_and_give_latex_ocrs_outputs():
    cfg = load_config(FIXTURES / "tiny_config.yaml")  # a LaTeX-OCR config (its keys)
    model = get_model(cfg).eval()
    assert not model.decoder.has_bias
    load_model_weights(model, FIXTURES / "tiny_weights.pth")
    assert model.decoder.has_bias  # its decoder's layer norm, attention and logit biases
    reference = torch.load(FIXTURES / "tiny_outputs.pth", weights_only=True)
    with torch.no_grad():
        memory = model.encode(reference["images"])
        logits = model.decoder(reference["tgt"], memory)
    torch.testing.assert_close(memory, reference["memory"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, reference["logits"], atol=1e-4, rtol=1e-4)
    # generation's KV-cached step (and so the ONNX export) reads the same biases
    state = model.decoder.start(memory, max_len=reference["tgt"].shape[1], precision="fp32")
    with torch.no_grad():
        for i in range(reference["tgt"].shape[1]):
            torch.testing.assert_close(state.step(reference["tgt"][:, i]),
                                       reference["logits"][:, i], atol=1e-4, rtol=1e-4)


def test_decoder_biases_start_at_zero_and_change_nothing():
    cfg = load_config(FIXTURES / "tiny_config.yaml")
    torch.manual_seed(0)
    model = get_model(cfg).eval()
    tgt, memory = torch.tensor([[1, 5, 9, 12]]), torch.randn(1, 32, cfg.dim)
    with torch.no_grad():
        before = model.decoder(tgt, memory)
        model.decoder.add_biases()
        after = model.decoder(tgt, memory)
    torch.testing.assert_close(after, before)
    torch.manual_seed(0)  # built with them (decoder_bias), the seeded init is the same
    biased = get_model(load_config(FIXTURES / "tiny_config.yaml", ["decoder_bias=true"]))
    assert all(torch.equal(biased.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match="another architecture .*decoder_bias"):
        from pix2tex.checkpoint import check_compatible
        check_compatible({"config": {"decoder_bias": True}}, {"decoder_bias": False}, None, "x.pth")


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
