"""The LatexOCR API and the `pix2tex` CLI, on a tiny model trained for this session."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pix2tex.predict import LatexOCR, ModelNotFound, main
from pix2tex.preprocess import ImageError, normalize

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ocr(tiny_model):
    return LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1)


@pytest.fixture(scope="module")
def images(tiny_model):
    return list(tiny_model.images[:6])


def run_cli(args, capsys, stdin: bytes | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code or 0, out.out, out.err


# --- API -------------------------------------------------------------------------------------

def test_every_source_type_gives_the_same_latex(ocr, images):
    path = images[0]
    expected = ocr(path)
    assert isinstance(expected, str) and expected  # a trained model says something
    data = path.read_bytes()
    pil = Image.open(path)
    for source in (str(path), data, io.BytesIO(data), pil, np.asarray(pil.convert("L")),
                   np.asarray(pil.convert("RGB"))):
        assert ocr(source) == expected


def test_greedy_is_the_models_greedy_decoding(ocr, images):
    """The API adds preprocessing and detokenizing, nothing else: same ids as model.generate."""
    from pix2tex.dataset.transforms import MEAN, STD

    page = ocr.preprocess(images[1])
    x = torch.from_numpy((page.astype(np.float32) / 255 - MEAN) / STD)[None, None]
    with torch.inference_mode():
        ids = ocr.model.generate(x, temperature=0.0)
    assert ocr(images[1]) == ocr.tokenizer.decode(ids[0].tolist())


def test_token_limit_cuts_and_says_so_and_a_decode_can_be_stopped(ocr, images):
    from pix2tex.cancel import DecodeCancelled
    from pix2tex.dataset.transforms import MEAN, STD

    pages = [ocr.preprocess(p) for p in images[:3]] + [None]
    texts, complete = ocr.recognize(pages, return_complete=True)
    assert texts == ocr.batch(images[:3]) + [""] and complete == [True] * 4
    cut, complete = ocr.recognize(pages, max_len=2, return_complete=True)
    for page, text, done in zip(pages[:3], cut, complete):
        x = torch.from_numpy((page.astype(np.float32) / 255 - MEAN) / STD)[None, None]
        with torch.inference_mode():
            ids = ocr.model.generate(x)[0].tolist()
        # greedy: the first 2 tokens of the whole formula, complete only if EOS is among them
        assert text == ocr.tokenizer.decode(ids[:2]) and done == (ocr.cfg.eos_token in ids[:2])
    assert complete[3] and not any(complete[:3])  # the memorized formulas are longer than 2 tokens
    with pytest.raises(DecodeCancelled):
        ocr.recognize(pages, should_stop=lambda: True)


def test_batch_equals_single_calls(ocr, images):
    single = [ocr(p) for p in images]
    assert ocr.batch(images) == single
    assert len(set(single)) > 1  # the model tells the formulas apart (not one constant answer)


def test_mixed_sizes_share_a_decoding_pass_and_get_the_ids_of_single_images(ocr, tiny_model):
    """Each size is encoded on its own and the padded memories are masked, so batch-mates of
    other sizes change nothing (float32: the same ids)."""
    paths = list(tiny_model.images) + sorted(Path(tiny_model.data.val_images).glob("*.png"))
    pages = [ocr.preprocess(p) for p in paths]
    assert len({p.shape for p in pages}) >= 3
    single = [ocr._generate([p], 1, 0.0)[0][0] for p in pages]  # (ids, logprob)
    mixed = ocr._generate(pages[:ocr.batch_size], 1, 0.0)[0]
    for alone, together in zip(single, mixed):
        np.testing.assert_array_equal(together[:len(alone)], alone)
        assert (together[len(alone):] == 0).all()  # PAD after the row's end
    before = ocr.decode_batches
    texts = ocr.recognize(pages)
    assert ocr.decode_batches - before == -(-len(pages) // ocr.batch_size)
    assert texts == [ocr.tokenizer.decode(ids) for ids in single]
    assert len(set(texts)) > 3


def test_beam_search_option(ocr, images):
    beam = ocr(images[0], beam_width=3)
    assert isinstance(beam, str) and beam
    assert ocr.batch(images[:2], beam_width=3)[0] == beam


def test_confidence_is_the_answers_log_probability(ocr, images):
    """`confidence` = sum of log p over the answer's tokens (its end included), by teacher
    forcing the answer through the model; a blank page has none."""
    import torch

    page = ocr.preprocess(images[0])
    reading = ocr.read([page, None])
    ids = ocr.tokenizer.encode(reading[0].latex)
    tgt = torch.tensor([[ocr.cfg.bos_token, *ids, ocr.cfg.eos_token]])
    with torch.no_grad():
        logits = ocr.model.logits(torch.from_numpy(normalize(page[None])), tgt[:, :-1]).float()
    logits[..., [ocr.cfg.pad_token, ocr.cfg.bos_token]] = float("-inf")
    want = logits.log_softmax(-1).gather(2, tgt[:, 1:, None]).sum().item()
    assert reading[0].confidence == pytest.approx(want, abs=1e-3) and reading[0].confidence < 0
    assert reading[1] == ("", True, None, None)
    assert ocr.read([page], beam_width=3)[0].confidence == pytest.approx(want, abs=1e-3)


def test_blank_and_tiny_images(ocr):
    assert ocr(Image.new("L", (300, 80), 255)) == ""  # blank: empty result, not a crash
    assert ocr(Image.new("RGB", (1, 1), (255, 255, 255))) == ""
    dot = Image.new("L", (5, 5), 255)
    dot.putpixel((2, 2), 0)
    assert isinstance(ocr(dot), str)  # one ink pixel: some answer, no crash


def test_bad_inputs_raise_image_error(ocr, images, tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    data = images[0].read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, reason in [("zero.png", "empty"), ("text.png", "not an image"), ("cut.png", "truncated")]:
        with pytest.raises(ImageError, match=reason):
            ocr(tmp_path / name)
    with pytest.raises(ImageError, match="image 1: .*empty"):
        ocr.batch([images[0], tmp_path / "zero.png"])


def test_missing_default_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("PIX2TEX_CHECKPOINT", str(tmp_path / "none.pth"))
    with pytest.raises(ModelNotFound, match="--checkpoint"):
        LatexOCR()


def test_small_model_is_the_shipped_student(monkeypatch, tiny_model, tmp_path, images, ocr,
                                           capsys):
    """model="small" / --model small reads with models/pix2tex-small.pth (torch); without that
    file, or asked for ONNX or beside a checkpoint, it says what to do."""
    import pix2tex.predict as P

    student = tmp_path / "pix2tex-small.pth"
    monkeypatch.setitem(P.SHIPPED_MODELS, "small", student)
    with pytest.raises(ModelNotFound, match="pix2tex-small.pth.*distillation"):
        LatexOCR(model="small")
    shutil.copy(tiny_model.checkpoint, student)
    small = LatexOCR(model="small", threads=1)
    assert small.backend == "torch" and small.checkpoint == str(student)
    assert small(images[0]) == ocr(images[0])
    with pytest.raises(ModelNotFound, match="torch weights only"):
        LatexOCR(model="small", backend="onnx")
    with pytest.raises(ValueError, match="not both"):
        LatexOCR(checkpoint=tiny_model.checkpoint, model="small")
    with pytest.raises(ValueError, match="model must be one of default, small"):
        LatexOCR(model="tiny")
    code, out, err = run_cli([str(images[0]), "--model", "small"], capsys)
    assert code == 0 and out == ocr(images[0]) + "\n", err


def test_the_shipped_student_is_small_and_reads_real_renders():
    """models/pix2tex-small.pth as shipped: at most 8 MB and 1/4 of the reader's parameters, the
    reader's tokenizer, and it reads TeX renders of common formulas exactly (fp32, greedy)."""
    from pix2tex.checkpoint import load_checkpoint
    from pix2tex.predict import SHIPPED_MODELS
    from pix2tex.verify import render_candidates

    assert SHIPPED_MODELS["small"].stat().st_size <= 8 * 10**6  # the 8 MB
    small = LatexOCR(model="small", precision="fp32", threads=1)
    reader = LatexOCR(backend="torch", precision="fp32", threads=1)
    params = [sum(p.numel() for p in m.model.parameters()) for m in (small, reader)]
    assert params[0] <= params[1] / 4, params
    shas = [load_checkpoint(m.checkpoint)["tokenizer_sha256"] for m in (small, reader)]
    assert shas[0] == shas[1]
    formulas = [r"E = m c ^ { 2 }", r"x ^ { 2 } + y ^ { 2 } = z ^ { 2 }", r"\alpha + \beta = \gamma",
                r"\frac { a + b } { c ^ { 2 } } = \sum _ { i = 1 } ^ { n } x _ { i } + \alpha \beta"]
    pages = [small.preprocess(np.pad(p, 12, constant_values=255))
             for p in render_candidates(formulas, 110)]
    assert [r.latex for r in small.read(pages)] == formulas


def test_tokenizer_found_beside_a_moved_checkpoint(tiny_model, tmp_path, images, ocr):
    """A checkpoint folder copied elsewhere (with its tokenizer.json) still loads."""
    ckpt = torch.load(tiny_model.checkpoint, weights_only=True)
    ckpt["tokenizer"] = "/nonexistent/tokenizer.json"
    ckpt["config"]["tokenizer"] = "/nonexistent/tokenizer.json"
    torch.save(ckpt, tmp_path / "model.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        LatexOCR(checkpoint=tmp_path / "model.pth")
    shutil.copy(tiny_model.data.tokenizer, tmp_path / "tokenizer.json")
    assert LatexOCR(checkpoint=tmp_path / "model.pth")(images[0]) == ocr(images[0])


def test_other_tokenizer_refused(tiny_model, tmp_path):
    from pix2tex.dataset.tokenizer import train_tokenizer

    other = train_tokenizer(["a + b", "x ^ { 2 }", "\\frac { 1 } { 2 }"], vocab_size=40)
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="another tokenizer"):
        LatexOCR(checkpoint=tiny_model.checkpoint, tokenizer=tmp_path / "other.json")


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_files_folder_and_formats(tiny_model, ocr, images, capsys, tmp_path):
    ck = ["--checkpoint", str(tiny_model.checkpoint), "--device", "cpu"]
    code, out, _ = run_cli([str(images[0]), *ck], capsys)
    assert code == 0 and out == ocr(images[0]) + "\n"  # one input: just the LaTeX
    code, out, _ = run_cli([str(images[0]), "-f", "inline", *ck], capsys)
    assert out == f"${ocr(images[0])}$\n"
    code, out, _ = run_cli([str(images[0]), "-f", "display", *ck], capsys)
    assert out == f"$${ocr(images[0])}$$\n"

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image, and not named like one: skipped")
    code, out, _ = run_cli([str(folder), "-f", "json", "--batch-size", "2", *ck], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [Path(r["file"]).name for r in rows] == [p.name for p in images[:3]]
    assert [r["latex"] for r in rows] == ocr.batch(images[:3])
    assert all(r["seconds"] > 0 for r in rows)
    # the answer's sequence log-probability, the same as the API's
    assert [r["confidence"] for r in rows] == [x.confidence for x in
                                               ocr.read([ocr.preprocess(p) for p in images[:3]])]
    assert all(r["confidence"] < 0 and r["complete"] for r in rows)
    code, out, _ = run_cli([str(folder), *ck], capsys)  # several inputs: names shown
    assert out.splitlines()[0] == f"{folder / images[0].name}: {ocr(images[0])}"


def test_cli_stdin(tiny_model, ocr, images, capsys, monkeypatch):
    code, out, _ = run_cli(["-", "--checkpoint", str(tiny_model.checkpoint), "-f", "json"], capsys,
                           stdin=images[2].read_bytes(), monkeypatch=monkeypatch)
    row = json.loads(out)
    assert code == 0 and row["file"] == "<stdin>" and row["latex"] == ocr(images[2])


def test_cli_bad_inputs_exit_nonzero_but_print_the_rest(tiny_model, ocr, images, capsys, tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 60), 255).save(blank)
    args = [str(images[0]), str(tmp_path / "zero.png"), str(tmp_path / "text.png"), str(blank),
            str(tmp_path / "missing.png"), str(images[1]), "-f", "json",
            "--checkpoint", str(tiny_model.checkpoint)]
    code, out, err = run_cli(args, capsys)
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in rows] == [str(images[0]), str(blank), str(images[1])]
    assert rows[0]["latex"] == ocr(images[0]) and rows[1]["latex"] == ""
    assert "zero.png: empty file" in err and "text.png: not an image" in err
    assert "missing.png: no such file" in err and "3 of 6 inputs could not be read" in err


def test_cli_missing_checkpoint(capsys, tmp_path, images):
    code, out, err = run_cli([str(images[0]), "--checkpoint", str(tmp_path / "nope.pth")], capsys)
    assert code == 2 and out == "" and "checkpoint not found" in err


def test_python_dash_m_entry_point(tiny_model, ocr, images):
    """`python -m pix2tex.predict` in a fresh process, default checkpoint from the environment."""
    env = {**os.environ, "PIX2TEX_CHECKPOINT": str(tiny_model.checkpoint), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pix2tex.predict", str(images[0]), "-f", "inline"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"${ocr(images[0])}$\n"


def test_stream_pages_that_join_a_running_decode_read_as_alone():
    """Continuous batching (the service's): with the shipped reader, real renders of three sizes
    join a running greedy decode at different steps, each leaves at its own end, and every page
    reads exactly as it does alone (fp32), with the same confidence; a dropped page never comes
    back; the stream is reusable once empty."""
    from pix2tex.verify import render_candidates

    formulas = [r"\int _ { 0 } ^ { \infty } e ^ { - x ^ { 2 } } d x = \frac { \sqrt { \pi } } { 2 }",
                r"E = m c ^ { 2 }",
                r"\frac { a + b } { c ^ { 2 } } = \sum _ { i = 1 } ^ { n } x _ { i } + \alpha \beta"]
    reader = LatexOCR(backend="torch", precision="fp32")
    pages = [reader.preprocess(np.pad(p, 12, constant_values=255))
             for p in render_candidates(formulas, 110)]
    assert len({p.shape for p in pages}) == 3
    alone = [reader.read([page])[0] for page in pages]
    stream = reader.stream()
    got = {}
    stream.add([pages[0]], ["a"])
    for _ in range(3):
        got.update(stream.step())
    stream.add(pages[1:], ["b", "c"])  # join 3 tokens into the first one's decode
    stream.add([pages[0]], ["dropped"])
    stream.step()
    stream.drop(["dropped"])
    while len(stream):
        got.update(stream.step())
    assert set(got) == {"a", "b", "c"}
    for key, expected in zip("abc", alone):
        assert got[key].latex == expected.latex and got[key].complete
        assert abs(got[key].confidence - expected.confidence) <= 1e-4
    assert stream.row_steps > stream.steps  # several pages per decoding step
    stream.add([pages[1]], ["again"])
    while len(stream):
        done = dict(stream.step())
    assert done["again"].latex == alone[1].latex


def test_stream_needs_greedy_torch_decoding(ocr):
    with pytest.raises(ValueError, match="continuous batching"):
        LatexOCR(checkpoint=ocr.checkpoint, device="cpu", beam_width=3).stream()
