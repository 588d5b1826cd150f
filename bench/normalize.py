"""Benchmark of dataset_tools.normalize: agreement with the reference normalizer, idempotence, speed.

    .venv/bin/python bench/normalize.py [--data DIR] [--repeat 3]

Prints one JSON object:
- `agreement`: exact match (runs of spaces collapsed) with im2markup_sample.norm.txt over the lines
  the reference parsed; `reference_rejects_also_rejected` checks the lines it could not parse.
- `idempotence`: share of im2latex_val.norm.txt lines that normalize to themselves.
- `speed`: lines/s on the im2markup sample and on wikipedia_math.raw.txt, best of `--repeat`, both
  wall clock and CPU time of this process (the machine is shared: CPU time is the steadier number).
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset_tools.normalize import NormalizeError, normalize, normalize_lines  # noqa: E402


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def agreement(raw, ref):
    compared = agree = ours_rejected = ref_rejected = ref_rejected_also = 0
    for r, m in zip(raw, ref):
        try:
            out = normalize(r)
        except NormalizeError:
            out = None
        if not m.strip():
            ref_rejected += 1
            ref_rejected_also += out is None
            continue
        compared += 1
        ours_rejected += out is None
        agree += out == " ".join(m.split())
    return {"percent": round(100 * agree / compared, 2), "agree": agree, "lines_compared": compared,
            "normalizer_rejects": ours_rejected, "reference_rejects": ref_rejected,
            "reference_rejects_also_rejected": ref_rejected_also}


def speed(lines, repeat):
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        kept, rejected = normalize_lines(lines)
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    n = len(kept) + len(rejected)
    return {"lines": n, "kept": len(kept), "rejected": len(rejected),
            "lines_per_s_wall": round(n / best_wall), "lines_per_s_cpu": round(n / best_cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    raw = read_lines(os.path.join(args.data, "im2markup_sample.raw.txt"))[:1200]
    ref = read_lines(os.path.join(args.data, "im2markup_sample.norm.txt"))[:1200]
    wiki = read_lines(os.path.join(args.data, "wikipedia_math.raw.txt"))
    val = [" ".join(l.split()) for l in read_lines(os.path.join(args.data, "im2latex_val.norm.txt")) if l.strip()]

    same = 0
    for line in val:
        try:
            same += normalize(line) == line
        except NormalizeError:
            pass
    print(json.dumps({
        "agreement": agreement(raw, ref),
        "idempotence": {"rate": round(same / len(val), 4), "same": same, "lines": len(val)},
        "speed": {"im2markup_sample": speed(raw, args.repeat), "wikipedia_math": speed(wiki, args.repeat)},
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
