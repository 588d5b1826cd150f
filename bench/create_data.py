"""Benchmark of ./create_data.sh: build a synthetic dataset from scratch, time every step.

    .venv/bin/python bench/create_data.py [--num 10000] [--workers N] [--keep DIR]

Prints one JSON object: `total_s` (wall clock of the whole script), `steps_s` (each step's wall
clock as the script reports it: formulas, split, tokenizer, render <split>, pkl_<split>),
`rerun_s` (a second run, which must find everything up to date), sample counts from the pkls and
`formulas_per_s` overall. The machine may be shared: compare numbers of one run, not across runs.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pix2tex.dataset.dataset import Im2LatexDataset  # noqa: E402


def run(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([os.path.join(REPO, "create_data.sh"), *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    if res.returncode:
        raise SystemExit(f"create_data.sh failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0, res.stdout + res.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--keep", help="build here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "data")
        common = ["--num", str(args.num), "--out", out, "--workers", str(args.workers)]
        total, log = run(common)
        rerun, log2 = run(common)
        steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[create_data\] (.+?): done in ([\d.]+)s", log)}
        counts = {}
        for split in ("train", "val", "test"):
            rep = Im2LatexDataset.load(os.path.join(out, f"{split}.pkl")).report
            counts[split] = {"formulas": rep.formulas, "kept": rep.kept, "missing": rep.missing,
                             "too_small": rep.too_small, "too_large": rep.too_large}
    print(json.dumps({
        "num": args.num, "workers": args.workers, "cpus": os.cpu_count(),
        "total_s": round(total, 1), "steps_s": steps, "rerun_s": round(rerun, 2),
        "rerun_all_up_to_date": log2.count("up to date") == 9,
        "formulas_per_s": round(args.num / total, 1), "counts": counts,
    }))


if __name__ == "__main__":
    main()
