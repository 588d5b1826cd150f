"""Training loop on a tiny real dataset (rendered formulas): learning, exact resume after a clean
stop / SIGTERM / SIGKILL, DDP on CPU, gradient accumulation, schedules, early stopping and the
errors said before training starts.

Everything runs on CPU with one thread per process (the machine is shared; one thread keeps each
process fast and bit-reproducible).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pix2tex.checkpoint import CheckpointError, load_checkpoint
from pix2tex.config import ConfigError, load_config
from pix2tex.dataset.dataset import Im2LatexDataset
from pix2tex.train import Runtime, build_scheduler, main, prepare_datasets, train

REPO = Path(__file__).resolve().parent.parent

# A model of a few hundred thousand parameters that still has every part of the real one.
TINY = {
    "backbone_layers": [1, 1], "dim": 32, "encoder_depth": 1, "num_layers": 1, "heads": 2,
    "max_seq_len": 64, "num_tokens": 300, "max_height": 64, "max_width": 256, "patch_size": 8,
    "batchsize": 4, "testbatchsize": 4, "valbatches": 1, "test_samples": 1, "device": "cpu",
    "log_freq": 1, "epochs": 100, "seed": 7,
}
# Exact-resume runs: dropout on (so the RNG state matters), a one-cycle schedule whose length is
# fixed, validation every 5 steps, at epoch ends (a few batches of 4 per epoch) and at the last of
# the 12 steps.
EXACT = {**TINY, "deterministic": True, "emb_dropout": 0.1, "sample_freq": 5,
         "scheduler": {"name": "onecycle", "total_steps": 12}}
STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(tmp_path, tiny_data, values, name="config.yaml") -> Path:
    path = tmp_path / name
    data = {**values, "data": str(tiny_data.train_pkl), "valdata": str(tiny_data.val_pkl),
            "model_path": str(tmp_path / "runs")}
    path.write_text(yaml.safe_dump(data))
    return path


def launch(config, *args):
    return subprocess.Popen([sys.executable, "-m", "pix2tex.train", "--config", str(config), *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, what):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{err[-3000:]}"
    return out + err


def logged_step(run_dir: Path) -> int:
    """Highest training step written to the run's metrics.jsonl so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return max(steps, default=0)


def stop_at(proc, run_dir: Path, step: int, sig) -> None:
    """Send `sig` once the run has logged `step` (fails if it ends first)."""
    deadline = time.time() + 240
    while logged_step(run_dir) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "run too slow"
        time.sleep(0.01)
    proc.send_signal(sig)


def assert_same_state(a: Path, b: Path):
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"] == STEPS
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), f"weights differ at {key}"
    for (i, sa), (j, sb) in zip(ca["optimizer"]["state"].items(), cb["optimizer"]["state"].items()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"optimizer state {i}.{k} differs"
    assert ca["scheduler"]["last_epoch"] == cb["scheduler"]["last_epoch"]


@pytest.fixture(scope="module")
def resume_runs(tiny_data, tmp_path_factory):
    """One uninterrupted 12-step run and three interrupted + resumed ones, run side by side:
    stop cleanly after 6 steps, SIGTERM after >= 4, SIGKILL at a random step with last.pth
    written after every step."""
    tmp = tmp_path_factory.mktemp("resume")
    config = write_config(tmp, tiny_data, EXACT)
    runs = tmp / "runs"
    kill_step = random.Random().randint(2, 8)
    first = {
        "straight": launch(config, "name=straight", f"max_steps={STEPS}"),
        "stopped": launch(config, "name=stopped", "max_steps=6"),
        "sigterm": launch(config, "name=sigterm", f"max_steps={STEPS}"),
        "sigkill": launch(config, "name=sigkill", f"max_steps={STEPS}", "save_steps=1"),
    }
    stop_at(first["sigterm"], runs / "sigterm", 4, signal.SIGTERM)
    stop_at(first["sigkill"], runs / "sigkill", kill_step, signal.SIGKILL)
    outputs = {}
    for name, proc in first.items():
        if name == "sigkill":
            proc.communicate(timeout=300)
            assert proc.returncode == -signal.SIGKILL
        else:
            outputs[name] = finish(proc, name)
    interrupted = {name: load_checkpoint(runs / name / "last.pth")
                   for name in ("stopped", "sigterm", "sigkill")}
    second = {name: launch(config, f"name={name}", f"max_steps={STEPS}", "--resume")
              for name in interrupted}
    for name, proc in second.items():
        outputs[name + "_resumed"] = finish(proc, name + " resumed")
    return {"runs": runs, "interrupted": interrupted, "outputs": outputs, "kill_step": kill_step,
            "batches_per_epoch": batches_per_epoch(load_config(config))}


def batches_per_epoch(cfg) -> int:
    data = Im2LatexDataset.load(cfg.data)
    prepare_datasets(cfg, data, None, Runtime(torch.device("cpu"), None))
    return len(data.batch_plan(0))


def test_resume_after_stop_is_bit_identical(resume_runs):
    runs = resume_runs["runs"]
    ckpt = resume_runs["interrupted"]["stopped"]
    n = resume_runs["batches_per_epoch"]  # the position is saved as batches done in an epoch
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (6, (6 - 1) // n, (6 - 1) % n + 1)
    assert "resuming from" in resume_runs["outputs"]["stopped_resumed"]
    assert_same_state(runs / "straight" / "last.pth", runs / "stopped" / "last.pth")
    # the run keeps its id (wandb's run id) across the resume; another run has its own
    resumed, straight = (load_checkpoint(runs / n / "last.pth") for n in ("stopped", "straight"))
    assert resumed["run_id"] == ckpt["run_id"] != straight["run_id"]


def test_sigterm_saves_then_resume_is_bit_identical(resume_runs):
    runs = resume_runs["runs"]
    ckpt = resume_runs["interrupted"]["sigterm"]
    assert ckpt["interrupted"] and 4 <= ckpt["step"] < STEPS
    assert "stopped (SIGTERM)" in resume_runs["outputs"]["sigterm"]
    assert_same_state(runs / "straight" / "last.pth", runs / "sigterm" / "last.pth")


def test_sigkill_at_any_step_then_resume_is_bit_identical(resume_runs):
    runs = resume_runs["runs"]
    ckpt = resume_runs["interrupted"]["sigkill"]
    assert 1 <= ckpt["step"] < STEPS, f"killed at step {resume_runs['kill_step']}"
    assert not ckpt["interrupted"]  # SIGKILL cannot be caught: this is an ordinary periodic save
    assert not list((runs / "sigkill").glob(".tmp-*"))  # a torn temporary file is cleaned up
    assert_same_state(runs / "straight" / "last.pth", runs / "sigkill" / "last.pth")


def test_checkpoint_holds_what_a_resume_needs(resume_runs):
    ckpt = load_checkpoint(resume_runs["runs"] / "straight" / "last.pth")  # weights_only=True
    for key in ("model", "optimizer", "scheduler", "rng", "epoch", "step",
                "batch_in_epoch", "best", "config", "tokenizer", "tokenizer_sha256"):
        assert key in ckpt, key
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["config"]["dim"] == TINY["dim"]
    best = load_checkpoint(resume_runs["runs"] / "straight" / "best.pth")
    assert best["best"] == ckpt["best"] and best["step"] == ckpt["best_step"]
    records = [json.loads(l) for l in (resume_runs["runs"] / "straight" / "metrics.jsonl").open()]
    val = [r["val"] for r in records if "val" in r]
    n = resume_runs["batches_per_epoch"]  # every 5 steps, at each epoch's end and at max_steps
    assert {r["step"] for r in records if "val" in r} == \
        {s for s in range(1, STEPS + 1) if s % 5 == 0 or s % n == 0 or s == STEPS}
    assert {"val_loss", "bleu", "edit_distance", "token_accuracy"} <= set(val[0])


def test_a_few_steps_decrease_the_loss_on_real_formulas(tiny_data, tmp_path):
    from pix2tex.models import get_model

    cfg = load_config(write_config(tmp_path, tiny_data, TINY), ["max_steps=14", "sample_freq=1000"])
    model = get_model(cfg)
    data = Im2LatexDataset.load(tiny_data.train_pkl).update(
        batchsize=4, transform="test", shuffle=False, max_seq_len=cfg.max_seq_len,
        max_dimensions=(cfg.max_width, cfg.max_height))

    def mean_loss():
        model.eval()
        with torch.no_grad():
            losses = [float(model(*data.load_batch(b))) for b in data.batch_plan(0)]
        return sum(losses) / len(losses)

    before = mean_loss()
    result = train(cfg, model=model)
    after = mean_loss()
    assert result["step"] == 14 and result["reason"] == "max_steps"
    assert after < before - 0.5, (before, after)
    assert result["metrics"]["val_loss"] < before


# SGD for the equivalence tests: its update is linear in the gradient, so float rounding stays at
# rounding size (Adam divides by sqrt(v) and blows up the rounding noise of near-zero gradients).
SGD = {"optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9}}


def test_gradient_accumulation_matches_the_full_batch(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, {**TINY, **SGD, "deterministic": True})
    states = []
    for micro in (-1, 2, 1):
        cfg = load_config(config, ["max_steps=3", f"micro_batchsize={micro}", f"name=m{micro}",
                                   "sample_freq=1000"])
        train(cfg)
        states.append(load_checkpoint(tmp_path / "runs" / f"m{micro}" / "last.pth")["model"])
    for other in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6)


def test_two_process_ddp_on_cpu_matches_one_process(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, {**TINY, **SGD, "deterministic": True, "sample_freq": 3})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pix2tex.train", "--config", str(config), "name=ddp", "max_steps=4"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(load_config(config, ["name=single", "max_steps=4"]))
    ddp = load_checkpoint(tmp_path / "runs" / "ddp" / "last.pth")
    single = load_checkpoint(tmp_path / "runs" / "single" / "last.pth")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and ddp["step"] == single["step"] == 4
    start = load_checkpoint(tmp_path / "runs" / "single" / "best.pth")  # validation at step 3
    moved = 0
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(value, start["model"][key])
    assert moved > len(single["model"]) // 2  # the weights did train between the two
    assert load_checkpoint(tmp_path / "runs" / "ddp" / "best.pth")["step"] == 3


def test_fast_dev_run_goes_end_to_end(tiny_data, tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_data, TINY), ["fast_dev_run=true", "name=dev"])
    result = train(cfg)
    assert result["step"] == 2 and result["metrics"] is not None
    folder = tmp_path / "runs" / "dev-fast_dev_run"  # never touches a real run's checkpoints
    assert (folder / "last.pth").exists() and (folder / "best.pth").exists()
    assert not (tmp_path / "runs" / "dev").exists()


def test_early_stopping(tiny_data, tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_data, TINY), [
        "sample_freq=1", "early_stopping.patience=2", "early_stopping.monitor=val_loss",
        "early_stopping.min_delta=100", "max_steps=20"])
    result = train(cfg)
    assert result["reason"] == "early_stopping" and result["step"] == 3


def test_schedules():
    cfg = load_config(None, ["optimizer.lr=1.0", "scheduler.name=multistep",
                             "scheduler.milestones=[2,4]", "scheduler.gamma=0.5"])
    param = torch.nn.Parameter(torch.zeros(1))

    def lrs(cfg, steps=6, total=6):
        opt = torch.optim.SGD([param], lr=cfg.optimizer.lr)
        sched = build_scheduler(cfg, opt, total)
        out = []
        for _ in range(steps):
            out.append(round(opt.param_groups[0]["lr"], 6))
            opt.step()
            sched.step()
        return out

    assert lrs(cfg) == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    cfg = load_config(None, ["optimizer.lr=1.0", "scheduler.name=cosine", "scheduler.warmup_steps=2",
                             "scheduler.min_lr=0.1"])
    assert lrs(cfg, 7, 6) == pytest.approx([0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1], abs=1e-6)
    cfg = load_config(None, ["optimizer.lr=1.0", "scheduler.name=step", "scheduler.step_size=2",
                             "scheduler.gamma=0.1"])
    assert lrs(cfg, 5) == [1.0, 1.0, 0.1, 0.1, 0.01]
    # warm restarts: every cycle of 4 steps warms up and anneals to min_lr at its last step, its
    # peak 0.5x the last one's
    cfg = load_config(None, ["optimizer.lr=1.0", "scheduler.name=cosine", "scheduler.warmup_steps=1",
                             "scheduler.min_lr=0.1", "scheduler.cycle_steps=4",
                             "scheduler.cycle_decay=0.5"])
    assert lrs(cfg, 12, 100) == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.5, 0.5, 0.3, 0.1,
                                               0.25, 0.25, 0.175, 0.1], abs=1e-6)
    with pytest.raises(ConfigError, match="cycle_steps.*cosine"):
        load_config(None, ["scheduler.name=onecycle", "scheduler.cycle_steps=4"])
    cfg = load_config(None, ["optimizer.lr=1.0", "scheduler=OneCycleLR"])  # LaTeX-OCR spelling
    got = lrs(cfg, 10, 10)
    assert max(got) == pytest.approx(1.0, rel=1e-3) and got[0] < 0.1 and got[-1] < 0.01


def test_misspelled_keys_fail_with_the_closest_valid_key(tiny_data, tmp_path, capsys):
    config = write_config(tmp_path, tiny_data, TINY)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "batchsise=8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "batchsise" in err and "'batchsize'" in err
    bad = write_config(tmp_path, tiny_data, {**TINY, "optimizer": {"lr": 1e-3, "wieght_decay": 0.1}},
                       name="bad.yaml")
    with pytest.raises(SystemExit):
        main(["--config", str(bad)])
    err = capsys.readouterr().err
    assert "optimizer.wieght_decay" in err and "weight_decay" in err and str(bad) in err
    with pytest.raises(ConfigError, match="Did you mean 'AdamW'"):
        train(load_config(config, ["optimizer.name=AdamWW"]))


def test_errors_before_training(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, TINY)
    with pytest.raises(ConfigError, match="dataset file not found: .*missing.pkl"):
        train(load_config(config, [f"data={tmp_path / 'missing.pkl'}"]))
    with pytest.raises(ConfigError, match="none of its .* samples fits max_seq_len=3"):
        train(load_config(config, ["max_seq_len=3"]))
    with pytest.raises(ConfigError, match="no image size has batchsize=64 samples"):
        train(load_config(config, ["batchsize=64"]))
    with pytest.raises(ConfigError, match="num_tokens=10"):
        train(load_config(config, ["num_tokens=10"]))
    two_ranks = Runtime(torch.device("cpu"), None, rank=0, world=2)
    with pytest.raises(ConfigError, match="micro_batchsize=4 must divide the per-process batch of 2"):
        prepare_datasets(load_config(config, ["micro_batchsize=4"]),
                         Im2LatexDataset.load(tiny_data.train_pkl), None, two_ranks)

    train(load_config(config, ["name=base", "max_steps=1"]))
    with pytest.raises(CheckpointError, match="another architecture .*dim: checkpoint 32 vs config 48"):
        train(load_config(config, ["name=base", "dim=48"]), resume=True)
    from pix2tex.dataset.tokenizer import train_tokenizer
    # another tokenizer that still knows every character of the data (no [UNK] labels)
    formulas = Path(tiny_data.formulas).read_text(encoding="utf-8").splitlines()
    other = train_tokenizer(formulas + ["a + b"], vocab_size=60)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="was tokenized with .*tokenizer.json"):
        train(load_config(config, [f"tokenizer={tmp_path / 'other.json'}"]))
    retokenized = Im2LatexDataset.build(tiny_data.train_images, tiny_data.formulas, other)
    retokenized.save(tmp_path / "other.pkl")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        train(load_config(config, ["name=base", f"data={tmp_path / 'other.pkl'}", "valdata=null"]),
              resume=True)
    with pytest.raises(CheckpointError, match="no load_ckpt set and no checkpoint"):
        train(load_config(config, ["name=nothing"]), resume=True)
    with pytest.raises(ConfigError, match="keeps best.pth by bleu, this config by val_loss"):
        train(load_config(config, ["name=base", "best_metric=val_loss"]), resume=True)


def test_resume_with_a_new_max_steps_follows_the_new_schedule(tiny_data, tmp_path):
    """A run planned for 12 one-cycle steps, stopped at 4 and resumed with max_steps=8, finishes the
    schedule at step 8 (LR at its floor) instead of stopping with the LR still high."""
    config = write_config(tmp_path, tiny_data, {**TINY, "name": "replan", "sample_freq": 100,
                                                 "scheduler": {"name": "onecycle", "pct_start": 0.25}})
    assert train(load_config(config, ["max_steps=12"]), echo=None)["step"] == 12  # reference
    lr = load_config(config).optimizer.lr
    first = load_config(config, ["max_steps=4", "scheduler.total_steps=12", "name=replan2"])
    assert train(first)["step"] == 4
    lines = []
    result = train(load_config(config, ["max_steps=8", "name=replan2"]), resume=True, echo=lines.append)
    assert result["step"] == 8
    assert any("re-planned from 12 to 8 steps" in line for line in lines), lines

    def logged_lr(name, step):
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [r["lr"] for r in rows if r.get("step") == step and "lr" in r][-1]

    assert logged_lr("replan2", 8) < 1e-4 * lr  # the 8-step schedule ran to its end
    assert logged_lr("replan", 8) > 0.1 * lr  # where the 12-step schedule still was


def test_validation_subset_spans_all_image_sizes(tiny_data, tmp_path):
    """valbatches < all: the batches are spread over the size-sorted plan, so the subset holds the
    smallest and the largest images (the first few alone are the shortest formulas)."""
    from pix2tex.dataset.tokenizer import load_tokenizer
    from pix2tex.models import get_model
    from pix2tex.train import validate

    cfg = load_config(write_config(tmp_path, tiny_data, {**TINY, "testbatchsize": 1}))
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None)
    val = Im2LatexDataset.load(tiny_data.val_pkl)
    prepare_datasets(cfg, Im2LatexDataset.load(tiny_data.train_pkl), val, rt)
    plan = val.batch_plan(0)
    assert len(plan) >= 4
    cfg.test_samples = 100
    tok = load_tokenizer(tiny_data.tokenizer)
    metrics = validate(get_model(cfg), val, tok, cfg, rt, max_batches=2)
    refs = [e["ref"] for e in metrics["examples"]]
    assert refs == [tok.decode(val.ids[plan[i][0]].tolist()) for i in (0, -1)]
    # as many batches as the plan has, or more: all of them
    everything = validate(get_model(cfg), val, tok, cfg, rt, max_batches=len(plan) + 5)
    assert everything["n"] == sum(len(b) for b in plan)


# --- LaTeX-OCR's configs and flags -----------------------------------------------------------------

LATEX_OCR = REPO / "tests" / "fixtures" / "latex_ocr"  # its shipped config.yaml and debug.yaml


def latex_ocr_overrides(tiny_data, tmp_path) -> list[str]:
    """Only where the data is and what fits it: LaTeX-OCR's configs want 10 (8) images of one size
    and images padded to max_width x max_height (pad=true, LaTeX-OCR's own key)."""
    return [f"data={tiny_data.train_pkl}", f"valdata={tiny_data.val_pkl}",
            f"tokenizer={tiny_data.tokenizer}", f"model_path={tmp_path / 'runs'}", "max_steps=2",
            "batchsize=4", "testbatchsize=4", "valbatches=1", "max_width=256", "max_height=64",
            "pad=true"]


def test_latex_ocr_config_yaml_trains_two_steps(tiny_data, tmp_path, capsys):
    # wandb=false: LaTeX-OCR's config.yaml logs to wandb (debug: false), not installed here
    main(["--config", str(LATEX_OCR / "config.yaml"), "--no_cuda",
          *latex_ocr_overrides(tiny_data, tmp_path), "wandb=false"])
    out = capsys.readouterr()
    assert "stopped (max_steps) at step 2" in out.out, out.err[-2000:]
    ckpt = load_checkpoint(tmp_path / "runs" / "pix2tex" / "last.pth")
    assert ckpt["config"]["device"] == "cpu" and ckpt["config"]["temperature"] == 0.2
    assert ckpt["config"]["optimizer"]["name"] == "Adam" and ckpt["step"] == 2


def test_latex_ocr_debug_yaml_trains_two_steps_with_its_flags(tiny_data, tmp_path):
    proc = launch(LATEX_OCR / "debug.yaml", "--no_cuda", "--debug",
                  *latex_ocr_overrides(tiny_data, tmp_path))
    out = finish(proc, "debug.yaml")
    assert "stopped (max_steps) at step 2" in out
    ckpt = load_checkpoint(tmp_path / "runs" / "pix2tex" / "last.pth")  # no fast_dev_run folder
    assert ckpt["config"]["debug"] is True and ckpt["config"]["wandb"] is False
    assert ckpt["config"]["patch_size"] == 32 and ckpt["config"]["pad"] is True


def as_latex_ocr_weights(state: dict, dim: int) -> dict:
    """A state dict of ours (with decoder biases) under LaTeX-OCR's names (x-transformers 0.15)."""
    import re

    names = [(r"token_emb\.emb\.weight$", "token_emb.weight"),
             (r"attn_layers\.final_norm\.gamma$", "norm.weight"),
             (r"attn_layers\.final_norm\.beta$", "norm.bias"),
             (r"(layers\.\d+)\.0\.0\.gamma$", r"\1.0.weight"), (r"(layers\.\d+)\.0\.0\.beta$", r"\1.0.bias"),
             (r"(layers\.\d+\.1)\.ff\.", r"\1.net.")]
    out = {}
    for key, value in state.items():
        if key == "decoder.net.pos_emb.emb.weight":
            value = value * dim ** -0.5  # 0.15 had no scale on the position embedding
        for pattern, replacement in names:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def test_training_starts_from_latex_ocr_weights_and_its_checkpoints_reload(tiny_data, tmp_path):
    from pix2tex.checkpoint import load_model_weights, save_checkpoint
    from pix2tex.models import get_model

    config = write_config(tmp_path, tiny_data, {**TINY, "sample_freq": 1000})
    torch.manual_seed(3)
    theirs = get_model(load_config(config, ["decoder_bias=true"]))
    with torch.no_grad():  # nonzero biases, so that losing one would show
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(as_latex_ocr_weights(theirs.state_dict(), TINY["dim"]), tmp_path / "weights.pth")
    train(load_config(config, ["name=from_latex_ocr", "max_steps=1", "optimizer.lr=0",
                               f"load_ckpt={tmp_path / 'weights.pth'}"]))
    ckpt = load_checkpoint(tmp_path / "runs" / "from_latex_ocr" / "last.pth")
    assert ckpt["config"]["decoder_bias"] is True
    again = get_model(load_config(config, ["decoder_bias=true"]))
    load_model_weights(again, ckpt)  # strict: every name and shape
    for key, value in theirs.state_dict().items():  # lr 0: the weights it started from
        torch.testing.assert_close(again.state_dict()[key], value, msg=key)


def test_save_freq_keeps_every_nth_epoch(tiny_data, tmp_path):
    cfg = load_config(write_config(tmp_path, tiny_data, TINY),
                      ["epochs=2", "save_freq=1", "sample_freq=1000", "name=ep"])
    result = train(cfg)
    per_epoch = batches_per_epoch(cfg)
    assert result["reason"] == "epochs" and result["step"] == 2 * per_epoch
    for epoch in (1, 2):
        saved = load_checkpoint(tmp_path / "runs" / "ep" / f"ep_e{epoch:02d}.pth")
        assert saved["step"] == epoch * per_epoch
    assert not (tmp_path / "runs" / "ep" / "ep_e03.pth").exists()


def test_validation_samples_at_the_config_temperature(tiny_data, tmp_path):
    from pix2tex.models import get_model
    from pix2tex.train import validate

    cfg = load_config(write_config(tmp_path, tiny_data, TINY), ["valbatches=2"])
    data = Im2LatexDataset.load(tiny_data.val_pkl)
    rt = Runtime(torch.device("cpu"), None)
    prepare_datasets(cfg, Im2LatexDataset.load(tiny_data.train_pkl), data, rt)
    torch.manual_seed(0)
    model = get_model(cfg)
    tok = data.tokenizer
    greedy = validate(model, data, tok, cfg, rt, 2)
    cfg.temperature = 2.0  # an untrained model: hot sampling differs from greedy
    hot = [validate(model, data, tok, cfg, rt, 2) for _ in range(2)]
    assert hot[0]["examples"] == hot[1]["examples"]  # seeded: every validation draws the same
    assert hot[0]["examples"] != greedy["examples"]


def test_a_fine_tuning_run_resumes_itself(tiny_data, tmp_path):
    from pix2tex.checkpoint import save_checkpoint

    config = write_config(tmp_path, tiny_data, {**TINY, "sample_freq": 1000})
    train(load_config(config, ["name=base", "max_steps=2"]))
    base = load_checkpoint(tmp_path / "runs" / "base" / "last.pth")
    save_checkpoint({"model": base["model"], "config": base["config"]}, tmp_path / "weights.pth")
    tune = ["name=tune", f"load_ckpt={tmp_path / 'weights.pth'}"]
    train(load_config(config, [*tune, "max_steps=2"]))  # starts from the weights
    # the same fine-tuning config with --resume continues its own run, not the weights
    result = train(load_config(config, [*tune, "max_steps=3"]), resume=True)
    assert result["step"] == 3


def test_resume_on_another_validation_set_starts_its_best_afresh(tiny_data, tmp_path):
    config = write_config(tmp_path, tiny_data, {**TINY, "sample_freq": 2})
    assert train(load_config(config, ["name=v", "max_steps=2"]))["best_step"] == 2
    lines = []
    # same validation set: the stored best carries over
    same = train(load_config(config, ["name=v", "max_steps=4"]), resume=True, echo=lines.append)
    assert not any("afresh" in line for line in lines) and same["best"] is not None
    # another one (here the train pkl): its first validation is the new best, whatever its value
    other = train(load_config(config, ["name=v", "max_steps=6", f"valdata={tiny_data.train_pkl}"]),
                  resume=True, echo=lines.append)
    assert any("starts afresh" in line for line in lines)
    assert other["best_step"] > 4  # the first validation after the switch (5: the epoch's end)
    assert load_checkpoint(tmp_path / "runs" / "v" / "best.pth")["step"] == other["best_step"]


def test_batch_source_resumes_shards_and_loads_in_workers(tiny_data):
    """The batches training reads: a resumed epoch skips the done ones and gets the same tensors,
    DDP ranks split each batch, DataLoader workers load what the main process would."""
    from pix2tex.train import BatchSource, epoch_batches

    ds = Im2LatexDataset.load(tiny_data.train_pkl).update(batchsize=2, transform="train",
                                                           keep_smaller_batches=True)
    rt = Runtime(torch.device("cpu"), None)
    plan = ds.batch_plan(1)
    full, resumed = BatchSource(ds, 1, 0, rt), BatchSource(ds, 1, 5, rt)
    assert len(full) == len(plan) and len(resumed) == len(plan) - 5
    index, x, t, real = resumed[1]
    assert index == 6 and real
    assert torch.equal(x, full[6][1]) and torch.equal(t, full[6][2])
    for k, (index, x, t, real) in enumerate(epoch_batches(ds, 1, 5, rt, num_workers=2, seed=0)):
        if k >= 4:
            break
        assert index == 5 + k and torch.equal(x, resumed[k][1]) and torch.equal(t, resumed[k][2])
    two = [BatchSource(ds, 1, 0, Runtime(torch.device("cpu"), None, rank=r, world=2)) for r in (0, 1)]
    b = next(k for k, batch in enumerate(plan) if len(batch) == 2)
    assert torch.equal(torch.cat([two[0][b][1], two[1][b][1]]), full[b][1])
