"""pix2tex.release: a training checkpoint -> a small bf16 release that the API and CLI load as the
default model (PIX2TEX_CHECKPOINT stands in for the shipped models/pix2tex.pth)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pix2tex.checkpoint import CheckpointError
from pix2tex.predict import LatexOCR
from pix2tex.release import make_release

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def release(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("release")
    return make_release(str(tiny_model.checkpoint), str(out)), out


def test_release_is_small_bf16_and_has_no_training_state(release, tiny_model):
    info, out = release
    ckpt = torch.load(info["model"], weights_only=True)
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.bfloat16}
    assert not {"optimizer", "scheduler", "rng"} & set(ckpt)
    assert ckpt["config"]["tokenizer"] is None and (out / "tokenizer.json").is_file()
    full = tiny_model.checkpoint.stat().st_size
    assert info["bytes"] < full / 4  # no Adam moments, half-size weights


def test_release_reads_like_the_checkpoint(release, tiny_model):
    """bf16 weights of the memorizing tiny model still give its greedy outputs on its images."""
    info, _ = release
    full = LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1, precision="fp32")
    small = LatexOCR(checkpoint=info["model"], device="cpu", threads=1, precision="fp32")
    images = list(tiny_model.images)
    agree = sum(full(i) == small(i) for i in images)
    assert agree >= len(images) - 1, f"only {agree}/{len(images)} outputs kept"


def test_cli_uses_the_default_model_from_any_folder(release, tiny_model, tmp_path):
    info, _ = release
    (tmp_path / "tokenizer.json").write_text("{}")  # a stray tokenizer in the cwd is not picked up
    env = {**os.environ, "PIX2TEX_CHECKPOINT": info["model"], "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pix2tex.predict", str(tiny_model.images[0])],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = LatexOCR(checkpoint=info["model"], device="cpu", threads=1)(tiny_model.images[0])
    assert out.stdout.strip() == expected


def test_release_needs_a_training_checkpoint(tiny_model, tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(tiny_model.checkpoint, weights_only=True)["model"], bare)
    with pytest.raises(CheckpointError, match="no config"):
        make_release(str(bare), str(tmp_path / "out"))
