#!/usr/bin/env python
"""A student beside its teacher on CPU, end to end: encoder + decoding at the formulas' real lengths.

    .venv/bin/python bench/student_speed.py [--teacher models/pix2tex.pth]
        [--student settings/distill/student-cpu.yaml | a student checkpoint (.pth)]
        [--data data/im2latex_val/test.pkl] [--images 96] [--threads 2] [--rounds 3]
        [--precision auto,fp32]

Both models read the same `--images` images of the test pkl (a seeded sample; im2latex val
formulas rendered at 100-130 dpi by scripts/quality.sh), one at a time (batch 1) and 16 at a time
(sorted by size and batched across sizes as `LatexOCR.read` batches them: each size encoded on its
own, the memories padded and masked). Every formula decodes exactly as many tokens as its ground
truth has, plus its end (a batch: as many as its longest formula), so both models do the same
work whatever they would answer: a student config (random weights) is timed like a trained one.
The models take turns, `--rounds` times, and the median round counts, so a busy machine slows
them alike. Precision: each of `--precision` (auto is what `pix2tex` decodes in: int8 decoder
linears on AMX CPUs; fp32 is what eval measures in).

Prints one JSON object: per model its parameters and milliseconds per formula for each precision
and batch size, the speed-ups, the parameter ratio, and the targets of the small model (at most
1/4 of the teacher's parameters, at least 3x its speed at batch 1 and 16).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BATCH_SIZES = (1, 16)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_model(path: str):
    """(model, source): a checkpoint's trained model (frozen, as distillation loads a teacher),
    or a config's model with random weights."""
    from pix2tex.config import load_config
    from pix2tex.distill.teacher import load_teacher
    from pix2tex.models import get_model

    if path.endswith((".yaml", ".yml")):
        return get_model(load_config(path)).eval(), "config (random weights)"
    return load_teacher(path)[0], "checkpoint"


def sample(data_pkl: str, n: int, seed: int = 0):
    """[(image [1, 1, H, W], tokens)] of n seeded test samples, sorted by image size."""
    import numpy as np

    from pix2tex.dataset.dataset import Im2LatexDataset

    data = Im2LatexDataset.load(data_pkl).update(transform="test", shuffle=False)
    picks = np.random.default_rng(seed).choice(len(data.formulas), min(n, len(data.formulas)),
                                               replace=False)
    items = [(data.load_batch([int(i)])[0], len(data.ids[i])) for i in picks]
    return sorted(items, key=lambda x: (x[0].shape[-2] * x[0].shape[-1], x[0].shape[-2:]))


def read_all(model, items, batch: int, precision: str) -> None:
    """Greedy decoding of every item, `batch` at a time, each batch for exactly its longest
    formula's tokens + EOS."""
    import torch

    with torch.inference_mode():
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            length = max(t for _, t in chunk) + 1
            if len(chunk) == 1:
                model.generate(chunk[0][0], max_len=length, min_len=length, precision=precision)
                continue
            memory, mask = model.encode_sizes([img[0] for img, _ in chunk], precision)
            model.generate(None, max_len=length, min_len=length, precision=precision,
                           memory=memory, memory_mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=os.path.join(REPO, "models", "pix2tex.pth"))
    p.add_argument("--student", default=os.path.join(REPO, "settings", "distill", "student-cpu.yaml"),
                   help="a student checkpoint, or a config (timed with random weights)")
    p.add_argument("--data", default=os.path.join(REPO, "data", "im2latex_val", "test.pkl"),
                   help="test pkl (scripts/quality.sh builds data/im2latex_val/test.pkl)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="auto,fp32")
    args = p.parse_args()

    import torch

    from pix2tex.models.model import resolve_precision

    if not os.path.isfile(args.data):
        raise SystemExit(f"{args.data} not found: build it with `./create_data.sh --test-formulas "
                         f"../shared/data/im2latex_val.norm.txt --tokenizer models/tokenizer.json "
                         f"--out data/im2latex_val` (or pass --data)")
    torch.set_num_threads(args.threads)
    models, sources = {}, {}
    for name, path in (("teacher", args.teacher), ("student", args.student)):
        models[name], sources[name] = load_model(path)
    items = sample(args.data, args.images)
    precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    ms = {name: {} for name in models}
    for precision in precisions:
        for batch in BATCH_SIZES:
            key = f"{precision}_batch{batch}"
            for model in models.values():  # warm-up: inference copies, allocator, int8 weights
                read_all(model, items[:batch], batch, precision)
            times = {name: [] for name in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    t0 = time.perf_counter()
                    read_all(model, items, batch, precision)
                    times[name].append(time.perf_counter() - t0)
            for name in models:
                ms[name][key] = round(1000 * statistics.median(times[name]) / len(items), 2)
            log(f"[student_speed] {key}: " + ", ".join(f"{n} {ms[n][key]} ms" for n in models))
    params = {name: sum(q.numel() for q in m.parameters()) for name, m in models.items()}
    speedup = {key: round(ms["teacher"][key] / ms["student"][key], 2) for key in ms["teacher"]}
    ratio = params["student"] / params["teacher"]
    print(json.dumps({
        "teacher": {"path": args.teacher, "params": params["teacher"], "ms_per_formula": ms["teacher"]},
        "student": {"path": args.student, "source": sources["student"], "params": params["student"],
                    "ms_per_formula": ms["student"]},
        "data": args.data, "images": len(items),
        "mean_tokens": round(statistics.fmean(t for _, t in items), 1),
        "threads": args.threads, "rounds": args.rounds,
        "precisions": {p_: resolve_precision(p_, torch.device("cpu")) for p_ in precisions},
        "params_ratio": round(ratio, 3), "speedup": speedup,
        "targets": {"params_ratio_max": 0.25, "speedup_min": 3.0,
                    "met": ratio <= 0.25 and min(speedup.values()) >= 3.0},
    }, indent=1))


if __name__ == "__main__":
    main()
