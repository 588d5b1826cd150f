#!/usr/bin/env python
"""Distillation table: the teacher and each student side by side, one dataset, one budget.

    .venv/bin/python bench/distill_table.py --data DIR --out OUT --teacher-steps 500 --steps 200 \
        [--experiments original,target_soft,...] [--seeds 1,2,3] [--threads 1] [--set key=value ...]
    # the shipped reader as the teacher, its student, real formulas (README "Distillation"):
    .venv/bin/python bench/distill_table.py --data data/mix --teacher-ckpt models/pix2tex.pth \
        --student settings/distill/student-cpu.yaml --train-samples 20000 \
        --test data/im2latex_val/test.pkl --image-match --steps 2000 --seeds 1,2,3 --out OUT

DIR is a create_data.sh folder (train.pkl, val.pkl, tokenizer.json). Phases, each skipped when its
output is already in OUT (so a rerun resumes where an interrupted one stopped):

1. teacher: settings/distill/teacher.yaml trained for --teacher-steps (unless --teacher-ckpt);
   with --train-samples N the students (and the pseudo labels) use a seeded sample of N training
   formulas, OUT/train.pkl;
2. pseudo labels (when a beamsearch/bs_* experiment is chosen): the teacher's beam outputs (width
   distill.beam_width, decoded in fp32) over the training set, OUT/train_bs.pkl, resumable;
3. each experiment settings/distill/<name>.yaml (on --student's model when given) distilled for
   --steps optimizer steps, once per seed (the same budget and data for all; validation once, at
   the end);
4. teacher and students evaluated on --test (default DIR/val.pkl; greedy, fp32): BLEU, normalized
   edit distance, token accuracy, exact match, with --image-match the rendered-image match,
   parameters, and decode milliseconds per formula, the models taking turns on the same batches
   so that a busy machine slows them alike. Several seeds: each experiment's mean ± standard
   deviation (results.json keeps every run).

Writes OUT/table.md and OUT/results.json and prints one JSON object (the table in `table`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EXPERIMENTS = ["original", "target_soft", "target_soft_embed", "beamsearch", "bs_soft", "bs_soft_embed"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def train_sample(data_pkl: str, n: int, out: str, seed: int = 0) -> str:
    """`out`: a seeded sample of `n` formulas of `data_pkl` (the same ones on every rerun)."""
    import numpy as np

    from pix2tex.dataset.dataset import Im2LatexDataset

    if os.path.isfile(out):
        return out
    data = Im2LatexDataset.load(data_pkl)
    if n >= len(data.formulas):
        raise SystemExit(f"--train-samples {n}: {data_pkl} holds only {len(data.formulas)} formulas")
    keep = sorted(np.random.default_rng(seed).choice(len(data.formulas), n, replace=False).tolist())
    Im2LatexDataset.from_samples(
        data.root, [data.paths[i] for i in keep], [data.formulas[i] for i in keep],
        [data.widths[i] for i in keep], [data.heights[i] for i in keep],
        [data.ids[i] for i in keep], data.tokenizer_path, **data.settings()).save(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with train.pkl, val.pkl, tokenizer.json")
    p.add_argument("--out", required=True, help="output folder (runs, pseudo labels, table)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS))
    p.add_argument("--student", help="student config the experiments run on (replaces the "
                                     "settings/distill/student.yaml they extend)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: each experiment trains once per seed (default: "
                        "once, with the config's seed)")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--teacher-ckpt", help="use this trained teacher instead of training one")
    p.add_argument("--train-samples", type=int,
                   help="students train on a seeded sample of this many training formulas")
    p.add_argument("--test", help="pkl the table measures on (default: DIR/val.pkl)")
    p.add_argument("--image-match", action="store_true",
                   help="also the share of predictions whose rendering matches the ground truth")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per student")
    p.add_argument("--label-batchsize", type=int, default=64,
                   help="images per beam-search batch when making the pseudo labels")
    p.add_argument("--eval-batches", type=int, help="evaluate on the first N test batches only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: fastest for these small models on a shared machine)")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value",
                   help="overrides for every student config (e.g. optimizer.lr=3e-3)")
    p.add_argument("--teacher-set", nargs="*", default=[], metavar="key=value",
                   help="overrides for the teacher's training config")
    args = p.parse_args()

    import torch

    from pix2tex.checkpoint import load_checkpoint, load_model_weights
    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import load_tokenizer
    from pix2tex.distill.main import aggregate, compare, distill, markdown_table
    from pix2tex.distill.pseudo_labels import make_pseudo_labels
    from pix2tex.distill.teacher import load_teacher
    from pix2tex.eval import prepare_dataset
    from pix2tex.models import get_model
    from pix2tex.train import train

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    data = {k: os.path.join(os.path.abspath(args.data), f) for k, f in
            (("data", "train.pkl"), ("valdata", "val.pkl"), ("tokenizer", "tokenizer.json"))}
    teacher_data = data["data"]
    if args.train_samples:
        data["data"] = train_sample(data["data"], args.train_samples, os.path.join(out, "train.pkl"))
    test_pkl = os.path.abspath(args.test) if args.test else data["valdata"]
    runs = os.path.join(out, "runs")
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    load_start = os.getloadavg()
    t_all = time.time()
    common = [f"{k}={v}" for k, v in data.items()] + [f"model_path={runs}", "device=cpu"]

    def timed(phase: str, fn):
        t0 = time.time()
        result = fn()
        timings[phase] = round(time.time() - t0, 1)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=2)
        log(f"[distill_table] {phase}: {timings[phase]:.0f}s")
        return result

    # 1. teacher
    teacher_cfg_path = os.path.join(REPO, "settings", "distill", "teacher.yaml")
    teacher_ckpt = args.teacher_ckpt and os.path.abspath(args.teacher_ckpt)
    if not teacher_ckpt:
        teacher_ckpt = os.path.join(runs, "teacher", "best.pth")
        if not os.path.isfile(teacher_ckpt):
            cfg = load_config(teacher_cfg_path, common + [
                f"data={teacher_data}", "name=teacher", f"max_steps={args.teacher_steps}",
                f"sample_freq={args.teacher_steps}", *args.teacher_set])
            timed("teacher", lambda: train(cfg, echo=log))
    teacher, tcfg, _ = load_teacher(teacher_ckpt)

    # 2. pseudo labels, decoded in fp32 (the default of make_pseudo_labels)
    bs_pkl = os.path.join(out, "train_bs.pkl")
    if any(n in ("beamsearch", "bs_soft", "bs_soft_embed") for n in names) and not os.path.isfile(bs_pkl):
        width = load_config(os.path.join(REPO, "settings", "distill", "beamsearch.yaml")).distill.beam_width
        meta = timed("pseudo_labels", lambda: make_pseudo_labels(
            teacher, Im2LatexDataset.load(data["data"]), bs_pkl, beam_width=width,
            batchsize=args.label_batchsize, min_dimensions=(tcfg.min_width, tcfg.min_height),
            progress=True))
        log(f"[distill_table] pseudo labels: {json.dumps(meta)}")

    # 3. students, equal budgets, once per seed
    students, configs = {}, {}
    for name in names:
        for seed in seeds:
            run = name if seed is None else f"{name}-seed{seed}"
            # epochs unbounded: --steps is every student's budget, whatever the training set's size
            cfg = load_config(os.path.join(REPO, "settings", "distill", f"{name}.yaml"), common + [
                f"name={run}", f"max_steps={args.steps}", f"sample_freq={args.steps}", "epochs=1000000",
                f"distill.teacher_ckpt={teacher_ckpt}", "distill.teacher_config=null",
                *([f"seed={seed}"] if seed is not None else []),
                *([f"distill.pseudo_labels={bs_pkl}"] if name in ("beamsearch", "bs_soft", "bs_soft_embed")
                  else []), *args.set], extends=args.student)
            exported = os.path.join(runs, run, "student", "best.pth")
            if not os.path.isfile(exported):
                timed(run, lambda: distill(cfg, echo=log))
            ckpt = load_checkpoint(exported)
            model = get_model(load_config(None, base=ckpt["config"]))
            load_model_weights(model, ckpt, exported)
            students[run], configs[run] = model, (name, cfg)

    # 4. side by side on the test set
    first_cfg = next(iter(configs.values()))[1] if configs else tcfg
    test = prepare_dataset(Im2LatexDataset.load(test_pkl), first_cfg, first_cfg.testbatchsize)
    models = {"teacher": teacher, **students}
    per_run = timed("evaluation", lambda: compare(
        models, test, load_tokenizer(data["tokenizer"]), device="cpu", max_batches=args.eval_batches,
        timing_batches=4, timing_rounds=3, image_match=args.image_match))
    for run in students:
        per_run[run]["train_seconds"] = timings.get(run)
    results = {"teacher": per_run["teacher"]}
    for name in names:  # one row per experiment: its seeds' mean (and standard deviation)
        results[name] = aggregate([per_run[r] for r, (n, _) in configs.items() if n == name])
    table = markdown_table(results, reference="teacher")
    t_total = time.time() - t_all
    original = results.get("original")
    summary = {
        "data": os.path.abspath(args.data), "train": data["data"], "test": test_pkl, "out": out,
        "threads": args.threads, "student": args.student or "settings/distill/student.yaml",
        "teacher": teacher_ckpt, "pseudo_label_precision": "fp32", "seeds": seeds,
        "budget": {"teacher_steps": args.teacher_steps if not args.teacher_ckpt else None,
                   "student_steps": args.steps, "batchsize": first_cfg.batchsize,
                   "train_samples": args.train_samples},
        "test_formulas": results["teacher"]["n"],
        "seconds": {**timings, "this_run": round(t_total, 1)},
        "load_average": {"start": [round(x, 2) for x in load_start],
                         "end": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
        "runs": per_run,
        "targets": {
            "smallest_params_ratio": min((results[n]["params"] / results["teacher"]["params"]
                                          for n in names), default=None),
            "min_speedup": min((results["teacher"]["decode_ms"] / results[n]["decode_ms"]
                                for n in names), default=None),
            "best_bleu_ratio": max((results[n]["bleu"] / results["teacher"]["bleu"]
                                    for n in names), default=None)
            if results["teacher"]["bleu"] else None,
            "kd_beating_original_bleu": [n for n in names if original and n != "original"
                                         and results[n]["bleu"] > original["bleu"]],
        },
        "table": table,
    }
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(table)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
