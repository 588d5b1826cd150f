"""Im2LatexDataset on real TeX renders: buckets, batches, filters, determinism, sharding, pkl safety,
build report, and ./create_data.sh end to end with resume."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pix2tex.dataset.dataset import DatasetError, Im2LatexDataset
from pix2tex.dataset.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer
from pix2tex.dataset import transforms
from pix2tex.dataset.transforms import MEAN, STD

REPO = Path(__file__).resolve().parent.parent


def load(tiny_data, **settings):
    return Im2LatexDataset.load(tiny_data.train_pkl).update(**settings)


def test_batches_share_one_size_and_hold_the_formulas(tiny_data):
    ds = load(tiny_data, batchsize=4, keep_smaller_batches=True, shuffle=True)
    tok = load_tokenizer(tiny_data.tokenizer)
    plan = ds.batch_plan(0)
    assert sorted(i for b in plan for i in b) == ds.indices  # every sample exactly once
    assert len(ds.buckets()) > 1 and len(ds) == len(plan)
    for b, (images, tgt) in enumerate(ds):
        idx = plan[b]
        sizes = {(ds.samples[i].width, ds.samples[i].height) for i in idx}
        assert len(sizes) == 1
        (w, h), = sizes
        assert images.shape == (len(idx), 1, h, w) and images.dtype == torch.float32
        assert h % 16 == 0 and w % 16 == 0  # the renderer pads to the patch size
        assert tgt.dtype == torch.int64 and tgt.shape[0] == len(idx)
        assert (tgt[:, 0] == BOS_ID).all() and ((tgt == EOS_ID).sum(1) == 1).all()
        assert tgt.shape[1] == max(len(ds.ids[i]) for i in idx) + 2
        for row, i in zip(tgt, idx):
            end = int((row == EOS_ID).nonzero())
            assert (row[end + 1:] == PAD_ID).all()
            assert tok.decode(row) == ds.formula(i)
    # Without keep_smaller_batches every batch is full.
    ds.update(keep_smaller_batches=False)
    assert ds.batch_plan(0) and all(len(b) == 4 for b in ds.batch_plan(0))
    # Images: white paper maps to (1 - MEAN) / STD, ink is darker.
    images, _ = ds.load_batch(ds.batch_plan(0)[0])
    assert images.max().item() == pytest.approx((1 - MEAN) / STD, abs=1e-4)
    assert images.min().item() < (0.5 - MEAN) / STD


def test_sample_access(tiny_data):
    ds = load(tiny_data)
    lines = tiny_data.formulas.read_text(encoding="utf-8").splitlines()
    for i, s in enumerate(ds.samples):
        assert os.path.isfile(ds.image_path(i)) and ds.image_path(i).endswith(s.path)
        line = int(os.path.basename(s.path)[:-4])
        assert s.formula == ds.formula(i) == " ".join(lines[line].split())
        assert Image.open(ds.image_path(i)).size == (s.width, s.height)


def test_filters(tiny_data):
    ds = load(tiny_data, keep_smaller_batches=True, batchsize=2)
    lengths = sorted(len(t) + 2 for t in ds.ids)
    cut = lengths[len(lengths) // 2]
    ds.update(max_seq_len=cut)
    assert 0 < len(ds.indices) < len(ds.samples)
    assert all(len(ds.ids[i]) + 2 <= cut for i in ds.indices)
    assert all(ds.load_batch(b)[1].shape[1] <= cut for b in ds.batch_plan(0))
    ds.update(max_seq_len=512)  # filters are settings: widening brings samples back
    widths = sorted(s.width for s in ds.samples)
    ds.update(max_dimensions=(widths[len(widths) // 2], 192))
    assert 0 < len(ds.indices) < len(ds.samples)
    assert all(ds.samples[i].width <= widths[len(widths) // 2] for i in ds.indices)
    ds.update(max_dimensions=(672, 192), min_dimensions=(widths[-1], 32))
    assert all(ds.samples[i].width == widths[-1] for i in ds.indices)
    with pytest.raises(DatasetError, match="unknown dataset setting 'batch_size'"):
        ds.update(batch_size=3)
    with pytest.raises(DatasetError, match="transform"):
        ds.update(transform="augment")


def test_plan_and_batches_are_pure_functions_of_seed_epoch_index(tiny_data):
    a = load(tiny_data, batchsize=2, transform="train", seed=7)
    b = load(tiny_data, batchsize=2, transform="train", seed=7)
    assert a.batch_plan(3) == b.batch_plan(3)
    assert a.batch_plan(3) != a.batch_plan(4)  # another epoch, another order
    plan = a.batch_plan(3)
    # b loads other batches first: the same batch is still bit-identical.
    b.load_batch(plan[1], epoch=3, batch_index=1)
    x1, t1 = a.load_batch(plan[0], epoch=3, batch_index=0)
    x2, t2 = b.load_batch(plan[0], epoch=3, batch_index=0)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    # The augmentation depends on the batch index and the seed; the test transform on neither.
    x3, _ = a.load_batch(plan[0], epoch=3, batch_index=5)
    assert not torch.equal(x1, x3)
    c = load(tiny_data, batchsize=2, transform="train", seed=8)
    assert c.batch_plan(3) != plan
    assert not torch.equal(c.load_batch(plan[0], epoch=3, batch_index=0)[0], x1)
    a.update(transform="test")
    assert torch.equal(a.load_batch(plan[0], 3, 0)[0], a.load_batch(plan[0], 9, 4)[0])
    # Without shuffle the plan is the same every epoch.
    a.update(shuffle=False)
    assert a.batch_plan(0) == a.batch_plan(1)
    # iter(dataset) is epoch `dataset.epoch`.
    b.update(epoch=3)
    first = next(iter(b))
    assert torch.equal(first[0], x1)


def test_save_load_after_moving_the_folder(tiny_data, tmp_path):
    ds = load(tiny_data, batchsize=3, keep_smaller_batches=True)
    first = tmp_path / "first"
    shutil.copytree(tiny_data.dir, first)
    moved = Im2LatexDataset.load(first / "train.pkl")
    moved.save(first / "again.pkl")
    raw = (first / "again.pkl").read_bytes()
    assert str(tmp_path).encode() not in raw and str(tiny_data.dir).encode() not in raw
    shutil.move(first, tmp_path / "second")
    again = Im2LatexDataset.load(tmp_path / "second" / "again.pkl")
    assert again.tokenizer_path == str(tmp_path / "second" / "tokenizer.json")
    assert again.samples == ds.samples and all(os.path.isfile(again.image_path(i)) for i in range(3))
    assert [list(t) for t in again.ids] == [list(t) for t in ds.ids]
    assert again.settings()["batchsize"] == 4  # settings saved with the pkl (the fixture's)
    again.update(batchsize=3, keep_smaller_batches=True)
    x1, t1 = ds.load_batch(ds.batch_plan(0)[0])
    x2, t2 = again.load_batch(again.batch_plan(0)[0])
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert again.report is not None and again.report.kept == ds.report.kept


def test_foreign_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"format": "pix2tex.Im2LatexDataset", "x": Evil()}))
    with pytest.raises(DatasetError, match=r"evil\.pkl: refused.*system"):
        Im2LatexDataset.load(evil)
    assert not marker.exists()
    # A pickled object (how LaTeX-OCR stored its datasets) is refused too, as is plain other data.
    obj = tmp_path / "object.pkl"
    obj.write_bytes(pickle.dumps(Im2LatexDataset.from_samples(tmp_path, [], [], [], [], [])))
    with pytest.raises(DatasetError, match=r"object\.pkl: refused.*Im2LatexDataset"):
        Im2LatexDataset.load(obj)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"data": [1, 2]}))
    with pytest.raises(DatasetError, match=r"other\.pkl: not a pix2tex dataset"):
        Im2LatexDataset.load(other)
    torn = tmp_path / "torn.pkl"
    torn.write_bytes(pickle.dumps({"format": "x", "data": list(range(100))})[:50])
    with pytest.raises(DatasetError, match=r"torn\.pkl"):
        Im2LatexDataset.load(torn)


def test_build_reports_corrupt_and_missing_images(tiny_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_data.train_images, images)
    names = sorted(p.name for p in images.glob("*.png"))
    (images / names[0]).write_bytes(b"not a png at all")
    data = (images / names[1]).read_bytes()
    (images / names[1]).write_bytes(data[: len(data) // 2])  # torn file: the header still reads
    (images / names[2]).unlink()
    ds = Im2LatexDataset.build(images, tiny_data.formulas, tiny_data.tokenizer, batchsize=2,
                               keep_smaller_batches=True)
    rep = ds.report
    assert sorted(os.path.basename(p) for p, _ in rep.corrupt) == names[:2]
    assert all(str(images) in p for p, _ in rep.corrupt)
    lines = len(tiny_data.formulas.read_text().splitlines())
    assert rep.formulas == lines and rep.missing == lines - len(names) + 1
    assert len(ds.samples) == len(names) - 3
    assert rep.kept == len(ds.indices) == len(ds.samples) - rep.too_small - rep.too_large - rep.too_long
    assert names[0] in rep.summary() and "corrupt 2" in rep.summary()
    assert not {s.path for s in ds.samples} & set(names[:3])
    assert sum(x.shape[0] for x, _ in ds) == rep.kept  # training never meets the broken files


def test_instances_do_not_share_state(tiny_data):
    a = load(tiny_data, batchsize=2, keep_smaller_batches=True)
    b = Im2LatexDataset.load(tiny_data.val_pkl).update(batchsize=2, keep_smaller_batches=True)
    n_a, n_b, buckets_b, a_indices = len(a.samples), len(b.samples), b.buckets(), a.indices
    a.update(batchsize=3)
    assert b.batchsize == 2 and b.buckets() == buckets_b
    a.combine(b)
    assert len(a.samples) == n_a + n_b and len(b.samples) == n_b
    assert all(os.path.isfile(a.image_path(i)) for i in range(len(a.samples)))
    assert sorted(i for batch in a.batch_plan(0) for i in batch) == a.indices
    assert len(a.indices) == len(a_indices) + len(b.indices) and a.indices[:len(a_indices)] == a_indices
    fresh = Im2LatexDataset.load(tiny_data.train_pkl)
    assert len(fresh.samples) == n_a and fresh.batchsize == 4


def test_latex_ocr_calls_work_as_there(tiny_data, tmp_path):
    """LaTeX-OCR's dataset calls: its constructor, Im2LatexDataset().load, update(**config),
    pad, combine, save, generate_tokenizer."""
    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import generate_tokenizer

    ds = Im2LatexDataset(str(tiny_data.formulas), str(tiny_data.train_images), str(tiny_data.tokenizer))
    built = Im2LatexDataset.build(tiny_data.train_images, tiny_data.formulas, tiny_data.tokenizer)
    assert ds.samples == built.samples and ds.report == built.report and ds.report.kept > 0
    with pytest.raises(DatasetError, match="equations, images, tokenizer"):
        Im2LatexDataset(str(tiny_data.formulas))
    assert len(Im2LatexDataset().samples) == 0
    ds.save(tmp_path / "train.pkl")
    data = Im2LatexDataset().load(tmp_path / "train.pkl")
    assert data.formulas == ds.formulas
    assert [os.path.normpath(data.image_path(i)) for i in range(3)] == \
        [os.path.normpath(ds.image_path(i)) for i in range(3)]

    # LaTeX-OCR's train.py: dataloader.update(**args, test=False) with the whole parsed config
    cfg = load_config(REPO / "tests" / "fixtures" / "latex_ocr" / "config.yaml")
    args = {**cfg, "epoch": 0, "device": "cpu", "no_cuda": False,  # what its parse_args adds
            "max_dimensions": [cfg.max_width, cfg.max_height],
            "min_dimensions": [cfg.min_width, cfg.min_height]}
    args.pop("tokenizer")  # its path is LaTeX-OCR's dataset/tokenizer.json
    data.update(**args, test=False)
    assert data.batchsize == cfg.batchsize == 64 and data.transform == "train" and data.seed == 42
    assert data.max_dimensions == (672, 192) and data.max_seq_len == 512 and data.pad is False
    data.update(batchsize=4, keep_smaller_batches=True, test=True)  # its validation loader
    assert data.transform == "test" and data.keep_smaller_batches
    with pytest.raises(DatasetError, match="unknown dataset setting 'batch_size'"):
        data.update(batch_size=4)
    # max_width/max_height (our config's names) set the dimensions too
    assert data.update(max_width=320, max_height=96).max_dimensions == (320, 96)

    # pad: every batch at max_dimensions, white (the normalized paper value) around the formula
    data.update(pad=True, max_width=672, max_height=192, shuffle=False)
    (w, h) = data.samples[data.batch_plan(0)[0][0]][2:]
    images, tgt = next(iter(data))
    assert images.shape[-2:] == (192, 672)
    white = (1.0 - MEAN) / STD
    assert torch.allclose(images[:, :, h:, :], torch.tensor(white)) and \
        torch.allclose(images[:, :, :, w:], torch.tensor(white))
    data.update(pad=False)
    assert next(iter(data))[0].shape[-2:] == (h, w)

    # combine two datasets, as LaTeX-OCR's dataset tool did for several folders
    val = Im2LatexDataset(tiny_data.val_formulas, tiny_data.val_images, tiny_data.tokenizer)
    n = len(data.samples)
    data.combine(val)
    assert len(data.samples) == n + len(val.samples)

    # generate_tokenizer(equations, output, vocab_size), and a dataset moved to that tokenizer
    tok = generate_tokenizer([str(tiny_data.formulas)], str(tmp_path / "tok.json"), 100)
    assert (tmp_path / "tok.json").is_file() and len(tok) <= 100
    data.update(tokenizer=str(tmp_path / "tok.json"))
    assert data.tokenizer_path == str(tmp_path / "tok.json")
    assert list(data.ids[0]) == tok.encode(data.formulas[0])
    assert tok.decode(data.ids[0]) == data.formulas[0]


def test_transforms_keep_size_and_vary(tiny_data):
    ds = load(tiny_data)
    img = np.array(Image.open(ds.image_path(0)).convert("L"))
    out = transforms.test_transform()(image=img)["image"]
    assert out.shape == (1, *img.shape) and out.dtype == torch.float32
    assert torch.allclose(out[0], (torch.from_numpy(img).float() / 255 - MEAN) / STD, atol=1e-5)
    tf = transforms.train_transform()
    outs = [tf(image=img)["image"] for _ in range(20)]
    assert all(o.shape == (1, *img.shape) for o in outs)
    assert sum(not torch.equal(o, out) for o in outs) >= 5  # augmentation happens, but not always


def run_create_data(*args, cwd):
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run([str(REPO / "create_data.sh"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def test_create_data_end_to_end_and_resume(tmp_path):
    out = tmp_path / "d"
    args = ["--num", "40", "--out", "d", "--vocab-size", "300", "--workers", "2", "--dpi", "100", "110",
            "--mean-tokens", "12", "--max-tokens", "30", "--seed", "3"]
    run_create_data(*args, cwd=tmp_path)  # relative --out, called from outside the repo
    lines = {s: (out / f"{s}.txt").read_text(encoding="utf-8").splitlines() for s in ("train", "val", "test")}
    assert [len(v) for v in lines.values()] == [36, 2, 2]
    assert len(set(sum(lines.values(), []))) == 40  # deduplicated, disjoint
    for s in ("train", "val", "test"):
        ds = Im2LatexDataset.load(out / f"{s}.pkl")
        assert len(ds.samples) + ds.report.missing == len(lines[s]) and ds.report.missing <= 1
        assert ds.tokenizer_path == str(out / "tokenizer.json")
        x, t = ds.load_batch([0])
        assert x.shape[1] == 1 and t[0, 0] == BOS_ID
    pngs = sorted(out.glob("images/*/*.png"))
    stamp = {p: p.stat().st_mtime_ns for p in pngs}
    pkl_time = (out / "train.pkl").stat().st_mtime_ns
    kept = {s: Im2LatexDataset.load(out / f"{s}.pkl").report.kept for s in ("train", "val", "test")}

    # A second run redoes nothing.
    log = run_create_data(*args, cwd=tmp_path)
    assert log.count("up to date") == 9, log  # formulas, split, tokenizer, 3 renders, 3 pkls
    assert {p: p.stat().st_mtime_ns for p in pngs} == stamp
    assert (out / "train.pkl").stat().st_mtime_ns == pkl_time

    # After an interrupted render (images missing), only the missing ones are drawn again.
    gone = pngs[:3]
    for p in gone:
        p.unlink()
    run_create_data(*args, cwd=tmp_path)
    assert all(p.exists() for p in gone)
    assert all(p.stat().st_mtime_ns == stamp[p] for p in pngs[3:])
    rebuilt = {s: Im2LatexDataset.load(out / f"{s}.pkl").report.kept for s in ("train", "val", "test")}
    assert rebuilt == kept


def test_create_data_from_real_formulas(shared_data, tmp_path):
    raw = (shared_data / "wikipedia_math.raw.txt").read_text(encoding="utf-8").splitlines()[:12]
    norm = (shared_data / "im2latex_val.norm.txt").read_text(encoding="utf-8").splitlines()[:12]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(raw) + "\n", encoding="utf-8")
    b.write_text("\n".join(norm + norm[:4]) + "\n", encoding="utf-8")  # duplicates are dropped
    out = tmp_path / "real"
    run_create_data("--formulas", str(a), str(b), "--out", str(out), "--split", "0.75,0.25,0",
                    "--vocab-size", "400", "--workers", "2", cwd=REPO)
    rejected = (out / "rejects_normalize.txt").read_text().splitlines()
    train, val, test = ((out / f"{s}.txt").read_text(encoding="utf-8").splitlines() for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(rejected) == 24 and test == []
    assert len(train) == round(0.75 * (len(train) + len(val)))
    assert set(" ".join(f.split()) for f in norm) <= set(train + val)  # normalized input stays as it is
    ds = Im2LatexDataset.load(out / "train.pkl")
    assert len(ds.samples) + ds.report.missing == len(train) and len(ds.samples) >= len(train) - 1
    assert len(Im2LatexDataset.load(out / "test.pkl").samples) == 0


def test_create_data_with_a_held_out_test_file(shared_data, tmp_path):
    """--test-formulas: that file is the test split, and none of its formulas is trained on (the
    quality benchmark: train on arXiv, measure on im2latex val)."""
    norm = [" ".join(f.split()) for f in
            (shared_data / "im2latex_val.norm.txt").read_text(encoding="utf-8").splitlines()[:20]]
    (tmp_path / "corpus.txt").write_text("\n".join(norm[:16]) + "\n", encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("\n".join(norm[12:]) + "\n", encoding="utf-8")
    out = tmp_path / "d"
    log = run_create_data("--formulas", str(tmp_path / "corpus.txt"), "--test-formulas",
                          str(tmp_path / "held_out.txt"), "--out", str(out), "--split", "0.75,0.25,0.5",
                          "--vocab-size", "400", "--workers", "2", cwd=REPO)
    train, val, test = ((out / f"{s}.txt").read_text(encoding="utf-8").splitlines()
                        for s in ("train", "val", "test"))
    assert test == norm[12:]  # normalized input stays as it is
    assert not set(test) & set(train + val)
    assert sorted(train + val) == sorted(norm[:12]) and len(train) == 9
    assert "4 of them removed from train/val" in log
    assert len(Im2LatexDataset.load(out / "test.pkl").samples) >= len(test) - 1


def test_create_data_test_only_with_a_given_tokenizer(shared_data, tmp_path):
    """--test-formulas without --formulas: a test-only set encoded with the model's tokenizer (the
    held-out measure of a shipped model). A formula with a character the tokenizer never saw is
    counted; evaluation keeps it (it scores the text), training skips it (an [UNK] label)."""
    from pix2tex.dataset.tokenizer import train_tokenizer

    norm = (shared_data / "im2latex_val.norm.txt").read_text(encoding="utf-8").splitlines()[:6]
    tok = tmp_path / "tok.json"
    train_tokenizer(["x + y = 1", "\\frac { x } { y }"], vocab_size=50).save(str(tok))
    held = tmp_path / "held_out.txt"
    held.write_text("\n".join(norm + ["x + y"]) + "\n", encoding="utf-8")
    out = tmp_path / "t"
    log = run_create_data("--test-formulas", str(held), "--tokenizer", str(tok), "--out", str(out),
                          "--workers", "2", cwd=REPO)
    assert not (out / "train.pkl").exists() and not (out / "images" / "train").exists()
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    ds = Im2LatexDataset.load(out / "test.pkl")
    assert len(ds.samples) == 7 and ds.report.unknown_chars == 6
    assert "unknown to the tokenizer 6" in log
    assert all(3 in ds.ids[i] for i in range(7) if ds.formulas[i] != "x + y")  # [UNK]
    assert len(ds.indices) == 7 and len(ds.update(skip_unknown=True).indices) == 1
    # without the tokenizer, a test-only set is refused with the fix
    res = subprocess.run([str(REPO / "create_data.sh"), "--test-formulas", str(held), "--out",
                          str(tmp_path / "u")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--tokenizer" in res.stderr
