"""Distillation: losses are minimal when student == teacher, grow otherwise, ignore padding."""
import pytest
import torch

from pix2tex.distill.losses import EmbeddingLoss, hard_loss, match_grid, soft_loss, target_loss

B, T, V, D = 3, 7, 11, 8


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(B, T, V, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False  # a short sequence: positions 4.. are padding
    mask[2, 6:] = False
    return teacher, mask, g


def test_soft_loss_zero_for_identical_logits_and_grows(batch):
    teacher, mask, g = batch
    assert soft_loss(teacher.clone(), teacher, mask, 2.0).abs() < 1e-6
    near = soft_loss(teacher + 0.1 * torch.randn(B, T, V, generator=g), teacher, mask, 2.0)
    far = soft_loss(teacher + 1.0 * torch.randn(B, T, V, generator=g), teacher, mask, 2.0)
    assert 0 < near < far


def test_soft_loss_has_t_squared_scaling(batch):
    teacher, mask, g = batch
    student = torch.randn(B, T, V, generator=g)
    t = 3.0
    p_t = torch.softmax(teacher / t, -1)
    kl = (p_t * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1))).sum(-1)
    expected = kl[mask].mean() * t * t
    torch.testing.assert_close(soft_loss(student, teacher, mask, t), expected)


def test_hard_loss_minimal_when_student_agrees(batch):
    teacher, mask, g = batch
    confident = torch.nn.functional.one_hot(teacher.argmax(-1), V).float() * 50
    assert hard_loss(confident, teacher, mask) < 1e-6
    assert hard_loss(torch.randn(B, T, V, generator=g), teacher, mask) > 1.0


def test_target_loss_ignores_padding(batch):
    teacher, mask, g = batch
    targets = torch.randint(3, V, (B, T), generator=g)
    targets[~mask] = 0
    base = target_loss(teacher, targets)
    changed = teacher.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 100  # logits at padding positions
    torch.testing.assert_close(target_loss(changed, targets), base)


@pytest.mark.parametrize("loss", ["soft", "hard", "mse", "cosine"])
def test_padding_positions_do_not_affect_losses(batch, loss):
    teacher, mask, g = batch
    student = torch.randn(B, T, V, generator=g)
    garbage = torch.randn(B, T, V, generator=g) * 100

    def value(s, t):
        if loss == "soft":
            return soft_loss(s, t, mask, 2.0)
        if loss == "hard":
            return hard_loss(s, t, mask)
        return EmbeddingLoss(V, V, loss)(s, t, mask)

    base = value(student, teacher)
    s2, t2 = student.clone(), teacher.clone()
    s2[~mask], t2[~mask] = garbage[~mask], -garbage[~mask]
    torch.testing.assert_close(value(s2, t2), base)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_embedding_loss_zero_when_equal_and_projects_widths(kind):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, D, generator=g)
    same = EmbeddingLoss(D, D, kind)
    assert same(hidden, hidden.clone()) < 1e-6
    assert same(hidden + torch.randn(B, T, D, generator=g), hidden) > 1e-3
    wider = EmbeddingLoss(D // 2, D, kind)  # student narrower than teacher: learned projection
    assert sum(p.numel() for p in wider.parameters()) == D // 2 * D + D
    loss = wider(torch.randn(B, T, D // 2, generator=g), hidden)
    loss.backward()
    assert wider.project.weight.grad is not None and loss > 0


def test_match_grid_resamples_encoder_memory():
    memory = torch.randn(2, 4 * 12, D)  # a 64x192 image at stride 16
    assert match_grid(memory, 48, (64, 192)) is memory
    out = match_grid(memory, 2 * 6, (64, 192))  # the same image at stride 32
    assert out.shape == (2, 12, D)
    constant = torch.ones(1, 48, D)
    torch.testing.assert_close(match_grid(constant, 12, (64, 192)), torch.ones(1, 12, D))


# --- distillation runs on tiny real models ----------------------------------------------------
# Teacher: the session's `tiny_model` (ViT, width 64, trained on 8 formulas of `tiny_data`);
# students: the six experiment configs of settings/distill/ shrunk to width 32.

import copy
import json
import os
from pathlib import Path

from pix2tex.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from pix2tex.config import ConfigError, load_config
from pix2tex.dataset.dataset import Im2LatexDataset
from pix2tex.distill.main import Distiller, distill, main
from pix2tex.distill.pseudo_labels import check_pseudo_labels, make_pseudo_labels
from pix2tex.distill.teacher import load_teacher, model_digest
from pix2tex.models import get_model

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = ["original", "target_soft", "target_soft_embed", "beamsearch", "bs_soft", "bs_soft_embed"]
TINY_STUDENT = ["encoder_structure=vit", "max_height=64", "max_width=256", "dim=32", "encoder_depth=1",
                "num_layers=1", "heads=2", "encoder_heads=2", "num_tokens=300", "max_seq_len=64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is fastest, and immune to a busy machine (two threads on a loaded
    2-core machine make each small op wait milliseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tiny_model):
    ckpt = load_checkpoint(tiny_model.checkpoint)
    cfg = load_config(None, base=ckpt["config"])
    model = get_model(cfg)
    load_model_weights(model, ckpt)
    return model.eval().requires_grad_(False), cfg


@pytest.fixture(scope="module")
def real_batch(tiny_data, teacher):
    data = Im2LatexDataset.load(tiny_data.train_pkl).update(
        batchsize=4, shuffle=False, transform="test", max_seq_len=64, max_dimensions=(256, 64))
    plan = data.batch_plan(0)
    return data.load_batch(plan[0], 0, 0)


@pytest.fixture(scope="module")
def bs_labels(tiny_model, tiny_data, teacher, tmp_path_factory):
    """Pseudo labels of the tiny training set: once interrupted after one batch, then resumed."""
    out = str(tmp_path_factory.mktemp("bs") / "train_bs3.pkl")
    data = Im2LatexDataset.load(tiny_data.train_pkl)
    kwargs = dict(beam_width=3, batchsize=8, min_dimensions=(32, 32))
    assert make_pseudo_labels(teacher[0], data, out, max_new_batches=1, **kwargs) is None
    assert Path(out + ".partial").is_file() and not Path(out).exists()
    meta = make_pseudo_labels(teacher[0], data, out, **kwargs)
    return out, meta


def distill_cfg(name, tiny_data, teacher_ckpt, tmp_path, bs_pkl=None, extra=()):
    overrides = [f"data={tiny_data.train_pkl}", f"valdata={tiny_data.val_pkl}",
                 f"tokenizer={tiny_data.tokenizer}", f"model_path={tmp_path}", f"name={name}",
                 "distill.teacher_config=null", f"distill.teacher_ckpt={teacher_ckpt}",
                 *TINY_STUDENT, "batchsize=4", "testbatchsize=8", "max_steps=2", "log_freq=1",
                 "sample_freq=100000", "valbatches=1", "device=cpu", "inference_precision=fp32",
                 "optimizer.lr=1e-3", *extra]
    if bs_pkl:
        overrides.append(f"distill.pseudo_labels={bs_pkl}")
    return load_config(REPO / "settings" / "distill" / f"{name}.yaml", overrides)


def all_parts(distill_overrides, **kw):
    d = load_config(None, [f"distill.{k}={v}" for k, v in {**distill_overrides, **kw}.items()]).distill
    return d


def test_load_teacher_freezes_the_model_and_its_digest_names_its_weights(tiny_model, tmp_path):
    model, cfg, ckpt = load_teacher(str(tiny_model.checkpoint))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert cfg.max_seq_len == model.max_seq_len and "model" in ckpt
    again = load_teacher(str(tiny_model.checkpoint))[0]
    assert model_digest(again) == model_digest(model)
    with torch.no_grad():
        next(again.parameters()).view(-1)[0] += 1
    assert model_digest(again) != model_digest(model)
    with pytest.raises(ConfigError, match="teacher_ckpt is not set"):
        load_teacher(None)
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(str(tmp_path / "missing.pth"))


def test_digest_of_a_resnet_teacher_covers_its_batchnorm_state():
    """The shipped reader's kind of model (ResNet encoder: BatchNorm buffers, 0-dim counters)."""
    model = get_model(load_config(REPO / "settings" / "distill" / "student-cpu.yaml"))
    digest = model_digest(model)
    with torch.no_grad():
        next(b for n, b in model.named_buffers() if n.endswith("running_mean"))[0] += 1
    assert model_digest(model) != digest


def test_model_level_losses_vanish_for_a_copy_of_the_teacher_and_grow_otherwise(teacher, real_batch):
    t_model, t_cfg = teacher
    images, tgt = real_batch
    d = all_parts({"r_target": 1.0, "r_soft": 1.0, "r_hard": 1.0, "r_embedding": 1.0,
                   "embed_decoder": True, "temperature": 2.0})
    copy_student = copy.deepcopy(t_model).requires_grad_(True)
    _, same = Distiller(copy_student, t_model, d).losses(images, tgt)
    assert same["soft"] < 1e-6 and same["embed_encoder"] < 1e-10 and same["embed_decoder"] < 1e-10
    torch.manual_seed(0)
    other = get_model(t_cfg)  # same shape, untrained
    _, diff = Distiller(other, t_model, d).losses(images, tgt)
    assert diff["soft"] > 0.1 and diff["embed_encoder"] > 1e-3 and diff["embed_decoder"] > 1e-3
    assert same["hard"] < diff["hard"]


def test_padding_and_tokens_after_eos_do_not_change_any_loss(teacher, real_batch):
    t_model, t_cfg = teacher
    images, tgt = real_batch
    d = all_parts({"r_target": 1.0, "r_soft": 1.0, "r_hard": 1.0, "r_embedding": 1.0,
                   "embed_decoder": True})
    student_cfg = load_config(None, TINY_STUDENT)
    torch.manual_seed(0)
    distiller = Distiller(get_model(student_cfg), t_model, d)  # 32 -> 64: learned projection
    total, parts = distiller.losses(images, tgt)
    padded = torch.cat([tgt, torch.zeros(len(tgt), 5, dtype=tgt.dtype)], 1)
    garbage = padded.clone()
    after_eos = (padded == 2).cumsum(1) - (padded == 2).long() > 0
    garbage[after_eos] = torch.randint(4, 300, (int(after_eos.sum()),))
    for changed in (padded, garbage):
        total2, parts2 = distiller.losses(images, changed)
        torch.testing.assert_close(total2, total)
        for k in parts:
            torch.testing.assert_close(parts2[k], parts[k])


def test_teacher_never_changes_gets_no_gradient_and_is_not_part_of_the_student(
        tiny_model, tiny_data, teacher, tmp_path):
    cfg = distill_cfg("target_soft_embed", tiny_data, tiny_model.checkpoint, tmp_path,
                      extra=["distill.r_hard=0.5", "max_steps=3"])
    summary = distill(cfg)
    t_model = summary["teacher"]
    assert all(not p.requires_grad and p.grad is None for p in t_model.parameters())
    for k, v in teacher[0].state_dict().items():  # bit-identical to the checkpoint's teacher
        assert torch.equal(v, t_model.state_dict()[k]), k
    run = Path(summary["run_dir"])
    ckpt = load_checkpoint(run / "last.pth")
    assert not any("teacher" in k for k in ckpt["model"])
    assert ckpt["model"]["embed_encoder.project.weight"].shape == (64, 32)  # trained and saved
    # the optimizer trained the student and both projections (weight and bias each), nothing else
    assert len(ckpt["optimizer"]["state"]) == len(list(summary["student"].parameters())) + 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"target", "soft", "hard", "embed_encoder", "embed_decoder"} <= set(logged[0])
    # resume continues the same run: projection heads and optimizer come back from last.pth
    cfg.max_steps = 5
    resumed = distill(cfg, resume=True)
    assert resumed["step"] == 5
    after = load_checkpoint(run / "last.pth")
    assert not torch.equal(after["model"]["embed_encoder.project.weight"],
                           ckpt["model"]["embed_encoder.project.weight"])
    # the exported student is a plain model checkpoint
    exported = load_checkpoint(summary["student_checkpoint"])
    student = get_model(load_config(None, base=exported["config"]))
    load_model_weights(student, exported)


def test_pseudo_label_pkl_holds_the_teachers_beam_outputs(bs_labels, teacher, tiny_data):
    out, meta = bs_labels
    t_model = teacher[0]
    assert not Path(out + ".partial").exists()
    labelled = Im2LatexDataset.load(out)
    source = Im2LatexDataset.load(tiny_data.train_pkl).update(
        batchsize=8, shuffle=False, transform="test", keep_smaller_batches=True, max_seq_len=64,
        max_dimensions=(256, 64))
    expected = {}
    for b, indices in enumerate(source.batch_plan(0)):
        images, _ = source.load_batch(indices, 0, b)
        ids = t_model.generate(images, max_len=meta["max_len"], beam_width=3)
        for i, row in zip(indices, ids.tolist()):
            if 2 in row and row.index(2) > 0:
                expected[os.path.realpath(source.image_path(i))] = row[:row.index(2)]
    assert meta["samples"] == len(labelled.paths) == len(expected) > 0
    for i, ids in enumerate(labelled.ids):
        assert ids.tolist() == expected[os.path.realpath(labelled.image_path(i))]
    lines = Path(out).with_suffix(".lst").read_text(encoding="utf-8").splitlines()
    assert lines == labelled.formulas == source.tokenizer.decode_batch(labelled.ids)
    assert meta["differ_from_ground_truth"] > 0  # the teacher only memorized 8 of them
    check_pseudo_labels(out, model_digest(t_model))
    with pytest.raises(ValueError, match="another teacher"):
        check_pseudo_labels(out, "0" * 64)
    # decoded in fp32 by default (the same labels on every CPU), and that is part of their identity
    assert meta["precision"] == "fp32"
    with pytest.raises(ValueError, match="decoded by the teacher in fp32, but eval_precision is int8"):
        check_pseudo_labels(out, model_digest(t_model), "int8")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_experiment_config_distills_a_few_steps(name, tiny_model, tiny_data, bs_labels, tmp_path):
    bs = bs_labels[0] if name.startswith(("bs", "beam")) else None
    cfg = distill_cfg(name, tiny_data, tiny_model.checkpoint, tmp_path, bs_pkl=bs)
    summary = distill(cfg)
    assert summary["step"] == 2 and summary["reason"] == "max_steps"
    logged = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    d = cfg.distill
    expected = {k for k, r in (("target", d.r_target), ("soft", d.r_soft), ("hard", d.r_hard),
                               ("embed_encoder", d.r_embedding)) if r}
    assert expected <= set(logged) and all(logged[k] > 0 for k in expected)
    if d.embed_decoder and d.r_embedding:
        assert logged["embed_decoder"] > 0
    ckpt = load_checkpoint(summary["student_checkpoint"])
    student = get_model(load_config(None, base=ckpt["config"]))
    load_model_weights(student, ckpt)
    assert sum(p.numel() for p in student.parameters()) < sum(
        p.numel() for p in summary["teacher"].parameters())


def student_val_loss(student_ckpt, tiny_data) -> float:
    """The exported student's mean cross-entropy on the tiny validation formulas (ground truth)."""
    ckpt = load_checkpoint(student_ckpt)
    student = get_model(load_config(None, base=ckpt["config"]))
    load_model_weights(student, ckpt)
    data = Im2LatexDataset.load(tiny_data.val_pkl).update(
        batchsize=8, shuffle=False, transform="test", keep_smaller_batches=True, max_seq_len=64,
        max_dimensions=(256, 64))
    with torch.no_grad():
        losses = [student.eval()(*data.load_batch(b, 0, i)).item()
                  for i, b in enumerate(data.batch_plan(0))]
    return sum(losses) / len(losses)


def test_soft_targets_reach_a_lower_val_loss_than_no_teacher_on_the_same_budget(
        tiny_model, tiny_data, tmp_path):
    """Knowledge distillation does what it is for: the same tiny student, seed, data and steps,
    trained with the teacher's soft targets (target_soft) ends with a lower validation loss than
    trained on the ground truth alone (original)."""
    losses = {}
    for name in ("original", "target_soft"):
        cfg = distill_cfg(name, tiny_data, tiny_model.checkpoint, tmp_path,
                          extra=["max_steps=80", "seed=0", "epochs=1000"])
        losses[name] = student_val_loss(distill(cfg)["student_checkpoint"], tiny_data)
    assert losses["target_soft"] < losses["original"], losses


def test_command_line_makes_pseudo_labels_distills_and_compares(tiny_model, tiny_data, tmp_path,
                                                                capsys):
    """`python -m pix2tex.distill` with a BS config whose label pkl is missing: the teacher's beam
    outputs are made first (pseudo_labels' own command line), then the student trains on them."""
    cfg_path = REPO / "settings" / "distill" / "bs_soft.yaml"
    bs = tmp_path / "labels" / "train_bs2.pkl"
    overrides = [f"data={tiny_data.train_pkl}", f"valdata={tiny_data.val_pkl}",
                 f"tokenizer={tiny_data.tokenizer}", f"model_path={tmp_path}", "name=cli",
                 "distill.teacher_config=null", f"distill.teacher_ckpt={tiny_model.checkpoint}",
                 f"distill.pseudo_labels={bs}", "distill.beam_width=2",
                 *TINY_STUDENT, "batchsize=4", "testbatchsize=8", "max_steps=2",
                 "sample_freq=100000", "valbatches=1", "device=cpu", "inference_precision=fp32"]
    main(["--config", str(cfg_path), "--eval-batches", "1", *overrides])
    out = capsys.readouterr().out
    assert "relabelled by the teacher (beam width 2" in out
    assert bs.is_file() and bs.with_suffix(".lst").is_file()
    assert "| teacher |" in out and "| student |" in out and "speed-up at fixed length" in out
    comparison = json.loads((tmp_path / "cli" / "student" / "comparison.json").read_text())
    assert set(comparison["results"]) == {"teacher", "student"}
    assert comparison["results"]["student"]["params"] < comparison["results"]["teacher"]["params"]
    ckpt = load_checkpoint(tmp_path / "cli" / "student" / "best.pth")
    assert ckpt["config"]["data"] == str(bs)  # trained on the teacher's labels


def test_student_of_the_shipped_reader_is_under_a_quarter_of_it_and_fits_it():
    """settings/distill/student-cpu.yaml under every experiment: the reader's tokens and image
    limits (so soft targets and labels carry over), at most 1/4 of its parameters."""
    from pix2tex.distill.main import check_pair

    reader = load_config(REPO / "settings" / "config-cpu.yaml")
    reader_params = sum(p.numel() for p in get_model(reader).parameters())
    student_cfg = REPO / "settings" / "distill" / "student-cpu.yaml"
    for name in EXPERIMENTS:
        cfg = load_config(REPO / "settings" / "distill" / f"{name}.yaml", extends=student_cfg)
        assert cfg.name == f"distill-{name}" and cfg.dim == 128 and cfg.encoder_structure == "resnet"
        check_pair(cfg, reader, {}, None)
    params = sum(p.numel() for p in get_model(cfg).parameters())
    assert params <= reader_params / 4, (params, reader_params)


def test_distill_table_runs_each_experiment_per_seed_and_reports_mean_and_spread(
        tiny_model, tiny_data, tmp_path):
    """bench/distill_table.py on the tiny teacher: a training sample, pseudo labels, two
    experiments x two seeds, image match; one row per experiment with its seeds' spread."""
    import subprocess
    import sys

    out = tmp_path / "table"
    cmd = [sys.executable, str(REPO / "bench" / "distill_table.py"), "--data", str(tiny_data.dir),
           "--out", str(out), "--teacher-ckpt", str(tiny_model.checkpoint),
           "--experiments", "original,beamsearch", "--seeds", "1,2", "--steps", "2",
           "--train-samples", "40", "--image-match", "--eval-batches", "2", "--label-batchsize", "8",
           "--set", *TINY_STUDENT, "batchsize=4", "testbatchsize=8", "valbatches=1",
           "inference_precision=fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"teacher", "original", "beamsearch"}
    assert set(summary["runs"]) == {"teacher", "original-seed1", "original-seed2",
                                    "beamsearch-seed1", "beamsearch-seed2"}
    for name in ("original", "beamsearch"):
        row, runs = summary["results"][name], [summary["runs"][f"{name}-seed{s}"] for s in (1, 2)]
        assert row["runs"] == 2 and "bleu_std" in row and "image_match" in row
        assert row["bleu"] == pytest.approx((runs[0]["bleu"] + runs[1]["bleu"]) / 2)
    assert summary["pseudo_label_precision"] == "fp32"
    assert len(Im2LatexDataset.load(out / "train.pkl").formulas) == 40
    table = (out / "table.md").read_text()
    assert "| original |" in table and "image match" in table and " ± " in table


def test_weight_selection_starts_the_student_inside_the_teacher():
    """`distill.init_from_teacher`: the student of the shipped reader takes the first channels,
    dims and heads of the reader's tensors (a gated output half by half), its extra shortcut
    starts as the identity, and it starts with a far lower loss on real rendered formulas than
    the same student at random."""
    import numpy as np

    from pix2tex.dataset.tokenizer import load_tokenizer
    from pix2tex.distill.weight_selection import select_weights
    from pix2tex.predict import LatexOCR
    from pix2tex.preprocess import normalize
    from pix2tex.verify import render_candidates

    reader = LatexOCR(backend="torch", precision="fp32")
    teacher = reader.model
    cfg = load_config(REPO / "settings" / "distill" / "target_soft.yaml",
                      extends=REPO / "settings" / "distill" / "student-cpu.yaml")
    torch.manual_seed(0)
    random_student, student = get_model(cfg), get_model(cfg)
    student.load_state_dict(random_student.state_dict())
    counts = select_weights(student, teacher)
    assert counts["selected"] > 50 and counts["identity"] == 1 and counts["kept"] <= 5, counts
    t, s = teacher.state_dict(), student.state_dict()
    conv = "encoder.backbone.layer2.1.conv1.weight"  # [128, 128, 3, 3] -> [64, 64, 3, 3]
    assert torch.equal(s[conv], t[conv][:64, :64])
    gated = "decoder.net.attn_layers.layers.0.1.to_out.0.weight"  # [2 x 256, 256] -> [2 x 128, 128]
    assert torch.equal(s[gated], torch.cat([t[gated][:128, :128], t[gated][256:384, :128]]))
    shortcut = s["encoder.backbone.layer1.0.downsample.0.weight"][:, :, 0, 0]  # 64 -> 32 channels
    assert torch.equal(shortcut, torch.eye(32, 64))

    formulas = [r"E = m c ^ { 2 }", r"\frac { a + b } { c ^ { 2 } } = \sum _ { i = 1 } ^ { n } x _ { i }",
                r"\int _ { 0 } ^ { 1 } f ( x ) d x", r"\alpha _ { i } ^ { 2 } + \beta _ { j }"]
    pages = [reader.preprocess(np.pad(p, 12, constant_values=255)) for p in render_candidates(formulas, 110)]
    h, w = max(p.shape[0] for p in pages), max(p.shape[1] for p in pages)
    images = torch.from_numpy(normalize(np.stack([np.pad(p, ((0, h - p.shape[0]), (0, w - p.shape[1])),
                                                         constant_values=255) for p in pages])))
    ids = load_tokenizer(REPO / "models" / "tokenizer.json").encode_batch(formulas)
    tgt = torch.full((len(ids), max(map(len, ids)) + 2), cfg.pad_token)
    for row, seq in zip(tgt, ids):
        row[:len(seq) + 2] = torch.tensor([cfg.bos_token, *seq, cfg.eos_token])
    with torch.no_grad():
        losses = {name: m.eval()(images, tgt).item() for name, m in
                  (("teacher", teacher), ("random", random_student), ("selected", student))}
    assert losses["teacher"] < 1.0 and losses["selected"] < losses["random"] - 1.0, losses
