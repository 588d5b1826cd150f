"""eval.py end to end: a tiny model trained here on the rendered tiny dataset, evaluated on its val pkl;
and scoring a predictions file against references without a model."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pix2tex import metrics as M
from pix2tex.eval import main

REPO = Path(__file__).resolve().parent.parent
KEYS = {"bleu", "edit_distance", "token_edit_accuracy", "token_accuracy", "exact_match", "n", "by_length"}


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A tiny hybrid model trained for a few dozen steps with the project's training loop."""
    import torch

    from pix2tex.config import load_config
    from pix2tex.train import train

    run = tmp_path_factory.mktemp("eval_run")
    cfg = load_config(None, [
        f"data={tiny_data.train_pkl}", f"tokenizer={tiny_data.tokenizer}", "backbone_layers=[1,1]",
        "dim=64", "encoder_depth=1", "num_layers=1", "heads=2", "max_height=64", "max_width=256",
        "min_height=16", "min_width=16", "num_tokens=300", "max_seq_len=48", "batchsize=4",
        "max_steps=30", "epochs=1000", "optimizer.lr=3e-3", "device=cpu", "inference_precision=fp32",
        f"model_path={run}", "name=tiny", f"output_path={run / 'outputs'}"])
    torch.manual_seed(0)
    summary = train(cfg)
    assert summary["step"] == 30
    return Path(summary["run_dir"]) / "last.pth"


def run_main(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_tsv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_eval_checkpoint_on_rendered_pkl(checkpoint, tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_main(["--checkpoint", checkpoint, "--data", tiny_data.val_pkl, "--batchsize", 4,
                               "--temperature", 0, "--output", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert "greedy" in out and "token_accuracy" in out and "0-25" in out
    report = json.loads((out_dir / "metrics.json").read_text())
    scores, settings = report["metrics"], report["settings"]
    assert KEYS <= set(scores) and "image_match" not in scores
    assert settings["checkpoint"] == str(checkpoint) and settings["temperature"] == 0
    # every sample of the val pkl that fits the model is evaluated once, smaller batches included
    rows = read_tsv(out_dir / "predictions.tsv")
    assert scores["n"] == len(rows) == settings["samples_fitting"] > 0
    val_formulas = set(tiny_data.val_formulas.read_text().splitlines())
    assert {r["ground_truth"] for r in rows} <= val_formulas
    assert len({r["image"] for r in rows}) == len(rows)
    for r in rows:
        assert float(r["edit_distance"]) == pytest.approx(M.edit_distance(r["prediction"], r["ground_truth"]))
    assert 0 <= scores["bleu"] <= 1 and 0 <= scores["token_accuracy"] <= 1
    assert sum(b["n"] for b in scores["by_length"].values()) == scores["n"]
    # re-scoring the written predictions without the model gives the same numbers
    code, out, err = run_main(["--predictions", out_dir / "predictions.tsv", "--output", tmp_path / "again"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["metrics"]
    for key in KEYS - {"by_length"}:
        assert again[key] == pytest.approx(scores[key])
    assert again["by_length"].keys() == scores["by_length"].keys()
    for bucket, values in scores["by_length"].items():
        assert again["by_length"][bucket] == pytest.approx(values)


def test_evaluate_is_the_models_decoding(checkpoint, tiny_data):
    """evaluate() adds batching, detokenizing and scoring to model.generate, nothing else."""
    import torch

    from pix2tex.checkpoint import load_checkpoint, load_model_weights
    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import load_tokenizer
    from pix2tex.eval import evaluate, prepare_dataset
    from pix2tex.models import get_model

    ckpt = load_checkpoint(checkpoint)
    cfg = load_config(None, base=ckpt["config"])
    model = get_model(cfg)
    load_model_weights(model, ckpt)
    tok = load_tokenizer(tiny_data.tokenizer)
    data = prepare_dataset(Im2LatexDataset.load(tiny_data.val_pkl), cfg, batchsize=3)
    scores, records = evaluate(model, data, tok, max_batches=2, progress=False)
    batches = data.batch_plan(0)[:2]
    assert scores["n"] == len(records) == sum(len(b) for b in batches)
    images, _ = data.load_batch(batches[0])
    with torch.inference_mode():
        expected = tok.decode_batch(model.generate(images).tolist())
    assert [r["prediction"] for r in records[:len(batches[0])]] == expected
    assert [r["ground_truth"] for r in records] == [data.formula(i) for b in batches for i in b]
    # beam search and seeded sampling run through the same path; sampling repeats with its seed
    beam, _ = evaluate(model, data, tok, beam_width=3, max_batches=1, progress=False)
    assert beam["n"] == len(batches[0])
    s1 = evaluate(model, data, tok, temperature=1.0, seed=5, max_batches=2, progress=False)[1]
    s2 = evaluate(model, data, tok, temperature=1.0, seed=5, max_batches=2, progress=False)[1]
    assert [r["prediction"] for r in s1] == [r["prediction"] for r in s2]


def test_eval_with_image_match_and_options(checkpoint, tiny_data, tmp_path, capsys):
    code, out, err = run_main(["--checkpoint", checkpoint, "--data", tiny_data.val_pkl, "--batchsize", 2,
                               "--num-batches", 2, "--beam-width", 2, "--image-match", "--workers", 1,
                               "--output", tmp_path, "--no-progress"], capsys)
    assert code == 0, err
    assert "beam search (width 2)" in out and "image_match" in out
    scores = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    rows = read_tsv(tmp_path / "predictions.tsv")
    assert scores["n"] == len(rows) <= 4
    assert all(r["image_match"] in ("True", "False") for r in rows)
    assert scores["image_match"] >= scores["exact_match"]


def test_missing_files_are_named(checkpoint, tiny_data, tmp_path, capsys):
    code, _, err = run_main(["--checkpoint", tmp_path / "nope.pth", "--data", tiny_data.val_pkl], capsys)
    assert code == 2 and "nope.pth" in err
    code, _, err = run_main(["--checkpoint", checkpoint, "--data", tmp_path / "none.pkl"], capsys)
    assert code == 2 and "none.pkl" in err
    code, _, err = run_main(["--checkpoint", checkpoint], capsys)  # the training config has no testdata
    assert code == 2 and "--data" in err


def test_score_files_without_model(tmp_path):
    pred, ref = tmp_path / "pred.txt", tmp_path / "ref.txt"
    pred.write_text("a b c d e\nx\n\n", encoding="utf-8")  # the empty line is an empty prediction
    ref.write_text("a b c d e f\ny\nz ^ { 2 }\n", encoding="utf-8")
    # the top-level shim, as a user runs it
    res = subprocess.run([sys.executable, "eval.py", "--predictions", pred, "--references", ref,
                          "--output", tmp_path / "out"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    scores = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert scores["n"] == 3 and scores["exact_match"] == 0.0
    assert scores["bleu"] == pytest.approx(M.bleu(["a b c d e", "x", ""], ["a b c d e f", "y", "z ^ { 2 }"]))
    assert scores["edit_distance"] == pytest.approx((1 / 6 + 1 + 1) / 3)
    ref.write_text("a\nb\n", encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "pix2tex.eval", "--predictions", pred, "--references", ref],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "3 lines" in res.stderr and "ref.txt has 2" in res.stderr


def test_scores_decode_in_fp32_whatever_the_inference_precision(checkpoint, tiny_data, tmp_path, capsys):
    """eval.py decodes in eval_precision (fp32) by default, so its scores do not follow the
    model's inference_precision (int8 on AMX CPUs under 'auto'); --precision asks for another one
    and the output names it."""
    runs = {}
    for name, extra in (("plain", []), ("int8_model", ["inference_precision=int8"])):
        code, out, err = run_main(["--checkpoint", checkpoint, "--data", tiny_data.val_pkl, "--batchsize", 4,
                                   "--output", tmp_path / name, "--no-progress", *extra], capsys)
        assert code == 0, err
        assert ", fp32," in out
        report = json.loads((tmp_path / name / "metrics.json").read_text())
        assert report["settings"]["precision"] == "fp32"
        runs[name] = [r["prediction"] for r in read_tsv(tmp_path / name / "predictions.tsv")]
    assert runs["plain"] == runs["int8_model"]
    code, out, err = run_main(["--checkpoint", checkpoint, "--data", tiny_data.val_pkl, "--batchsize", 4,
                               "--output", tmp_path / "bf16", "--no-progress", "--precision", "bf16"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "bf16" / "metrics.json").read_text())["settings"]["precision"] == "bf16"


def test_without_a_checkpoint_the_shipped_model_and_its_tokenizer(tiny_data, tmp_path, capsys):
    """No --checkpoint: models/pix2tex.pth with models/tokenizer.json beside it, although the pkl
    was built with another tokenizer (the references are its formula texts)."""
    code, out, err = run_main(["--data", tiny_data.val_pkl, "--num-batches", 1, "--batchsize", 2,
                               "--output", tmp_path / "shipped", "--no-progress"], capsys)
    assert code == 0, err
    settings = json.loads((tmp_path / "shipped" / "metrics.json").read_text())["settings"]
    assert Path(settings["checkpoint"]) == REPO / "models" / "pix2tex.pth"
    assert Path(settings["tokenizer"]).resolve() == REPO / "models" / "tokenizer.json"


def test_a_tokenizer_mismatch_names_both_files(checkpoint, tiny_data, tmp_path, capsys):
    from pix2tex.dataset.tokenizer import train_tokenizer

    other = tmp_path / "other.json"
    train_tokenizer(["x + y = 1", "\\frac { a } { b }"], vocab_size=40).save(str(other))
    code, _, err = run_main(["--checkpoint", checkpoint, "--data", tiny_data.val_pkl,
                             "--tokenizer", other], capsys)
    assert code == 2 and "another tokenizer" in err
    assert str(tiny_data.tokenizer) in err and str(other) in err and "None" not in err


def test_latex_ocr_flags(checkpoint, tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_main(["-c", checkpoint, "-d", tiny_data.val_pkl, "-b", 2, "-t", 0, "-n", 1,
                               "--no-cuda", "--output", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    settings = json.loads((out_dir / "metrics.json").read_text())["settings"]
    assert settings["batchsize"] == 2 and settings["num_batches"] == 1
    assert settings["device"] == "cpu" and settings["temperature"] == 0
    assert len(read_tsv(out_dir / "predictions.tsv")) <= 2  # one batch of two


def test_eval_a_folder_of_own_images(checkpoint, tiny_data, tmp_path, capsys):
    import shutil

    from dataset_tools.normalize import normalize
    from pix2tex.dataset.dataset import Im2LatexDataset

    val = Im2LatexDataset.load(tiny_data.val_pkl)
    folder = tmp_path / "mine"
    folder.mkdir()
    refs = []
    for k, i in enumerate(range(4)):  # renamed: pairing is by name order, not by index
        shutil.copy(val.image_path(i), folder / f"shot_{k:02d}.png")
        refs.append(val.formulas[i])
    (tmp_path / "refs.txt").write_text("\n".join(refs) + "\n")
    out_dir = tmp_path / "out"
    code, out, err = run_main(["--checkpoint", checkpoint, "--images", folder, "--references",
                               tmp_path / "refs.txt", "--output", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "metrics.json").read_text())
    assert report["metrics"]["n"] == 4 and report["settings"]["precision"] == "fp32"
    rows = read_tsv(out_dir / "predictions.tsv")
    assert [Path(r["image"]).name for r in rows] == [f"shot_{k:02d}.png" for k in range(4)]
    assert [r["ground_truth"] for r in rows] == [normalize(f) for f in refs]
    (tmp_path / "short.txt").write_text("\n".join(refs[:3]) + "\n")
    code, _, err = run_main(["--checkpoint", checkpoint, "--images", folder, "--references",
                             tmp_path / "short.txt", "--no-progress"], capsys)
    assert code == 2 and "has 4 images" in err and "has 3 lines" in err


def test_rerank_reports_what_verified_and_how_often_it_was_right(tiny_model, tmp_path, capsys):
    """--rerank K: the API's render-and-compare over the images; `verified` is measured against
    image match (the tiny model has memorized these formulas)."""
    import shutil

    folder = tmp_path / "mine"
    folder.mkdir()
    for path in tiny_model.images:
        shutil.copy(path, folder / path.name)
    (tmp_path / "refs.txt").write_text("\n".join(tiny_model.formulas) + "\n")
    out_dir = tmp_path / "out"
    code, out, err = run_main(["--checkpoint", tiny_model.checkpoint, "--images", folder,
                               "--references", tmp_path / "refs.txt", "--rerank", 3,
                               "--output", out_dir, "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "metrics.json").read_text())
    rerank = report["metrics"]["rerank"]
    assert rerank["k"] == 3 and 0 <= rerank["verified"] <= 1 and rerank["seconds_per_image"] > 0
    assert "image_match" in report["metrics"] and "rerank (k=3): verified" in out
    rows = read_tsv(out_dir / "predictions.tsv")
    assert {r["verified"] for r in rows} <= {"True", "False"} and len(rows) == len(tiny_model.images)
    if rerank["verified"]:  # what verified, image match confirms
        assert rerank["verified_precision"] == 1.0
