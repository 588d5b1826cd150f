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


def test_student_release_under_its_own_name_is_the_small_model(tiny_model, tmp_path, monkeypatch):
    """`--name pix2tex-small.pth --no-onnx`: the distilled student's release, which
    LatexOCR(model="small") reads (pointed at this folder)."""
    import pix2tex.predict as P
    from pix2tex.release import main

    main(["--checkpoint", str(tiny_model.checkpoint), "--out", str(tmp_path), "--name",
          "pix2tex-small.pth", "--no-onnx"])
    assert sorted(os.listdir(tmp_path)) == ["pix2tex-small.pth", "tokenizer.json"]
    monkeypatch.setitem(P.SHIPPED_MODELS, "small", tmp_path / "pix2tex-small.pth")
    small = LatexOCR(model="small", threads=1, precision="fp32")
    full = LatexOCR(checkpoint=tiny_model.checkpoint, threads=1, precision="fp32")
    assert small(tiny_model.images[0]) == full(tiny_model.images[0])


def test_release_needs_a_training_checkpoint(tiny_model, tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(tiny_model.checkpoint, weights_only=True)["model"], bare)
    with pytest.raises(CheckpointError, match="no config"):
        make_release(str(bare), str(tmp_path / "out"))


# --- the ONNX half of a release: what an install without torch reads with -------------------------

def test_release_writes_onnx_graphs_in_bf16_that_decode_like_torch(release, tiny_model):
    import onnx

    info, _ = release
    folder = Path(info["onnx"]["folder"])
    assert {p.name for p in folder.iterdir()} == {"encoder.onnx", "decoder_step.onnx",
                                                   "tokenizer.json", "pix2tex_onnx.json"}
    for graph in ("encoder.onnx", "decoder_step.onnx"):
        kinds = {i.data_type for i in onnx.load(folder / graph).graph.initializer}
        assert onnx.TensorProto.BFLOAT16 in kinds, graph  # the release's weights, stored as bf16
    onnx_ocr = LatexOCR(folder, threads=1)
    torch_ocr = LatexOCR(info["model"], device="cpu", threads=1, precision="fp32")
    assert (onnx_ocr.backend, torch_ocr.backend) == ("onnx", "torch")  # auto: the checkpoint's kind
    images = list(tiny_model.images)
    assert onnx_ocr.batch(images) == torch_ocr.batch(images)


def test_auto_backend_without_a_checkpoint(release, tiny_model, monkeypatch):
    import pix2tex.predict as predict

    info, _ = release
    monkeypatch.delenv("PIX2TEX_CHECKPOINT", raising=False)
    monkeypatch.setattr(predict, "RELEASED_ONNX", Path(info["onnx"]["folder"]))
    monkeypatch.setattr(predict, "DEFAULT_CHECKPOINT", Path(info["model"]))
    ocr = LatexOCR(threads=1)
    assert ocr.backend == "onnx"  # greedy: the released graphs
    assert LatexOCR(threads=1, beam_width=3).backend == "torch"  # beam search: the torch weights
    with pytest.raises(ValueError, match="decodes greedily only"):
        ocr(tiny_model.images[0], beam_width=3)


NO_TORCH = "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"


def test_reading_works_without_torch_and_training_says_which_extra(release, tiny_model):
    info, _ = release
    image = tiny_model.images[0]
    code = NO_TORCH + f"""
import pix2tex
from pix2tex import LatexOCR
from pix2tex.predict import main
ocr = LatexOCR({info['onnx']['folder']!r}, threads=1)
print(ocr({str(image)!r}))
main(["--checkpoint", {info['onnx']['folder']!r}, {str(image)!r}])
for what in ("import pix2tex.train", "LatexOCR({info['model']!r})"):
    try:
        exec(what)
    except ModuleNotFoundError as e:
        print("ERROR", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected = LatexOCR(info["model"], device="cpu", threads=1, precision="fp32")(image)
    assert lines[:2] == [expected, expected]  # the API and the CLI
    assert len(lines) == 4 and all("pip install 'pix2tex[train]'" in l for l in lines[2:]), lines
