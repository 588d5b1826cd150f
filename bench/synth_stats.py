"""Benchmark of dataset_tools.synth: speed, and how close synthetic formulas are to arXiv ones.

    .venv/bin/python bench/synth_stats.py [--n 20000] [--seed 0] [--corpus FILE]

Prints one JSON object: formulas/s (wall clock and CPU time of this process; other jobs on the
machine slow the first), mean/median length against the corpus, Jensen-Shannon divergences
(base 2) of the length histograms (5-token bins) and of the token frequencies over the corpus'
top-300 tokens (+ one bucket for the rest), coverage of the corpus' top-N tokens, and the share of
formulas holding each main construct. `real_reference` holds the same divergences for the
im2latex-100k validation formulas (real arXiv formulas from another source) against the corpus:
the scale on which the synthetic figures are to be read.
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset_tools.synth import SynthConfig, compare_to_corpus, generate  # noqa: E402

DATA = os.path.join(REPO, "..", "shared", "data")
CONSTRUCTS = {"frac": r"\frac", "sqrt": r"\sqrt", "sum": r"\sum", "int": r"\int",
              "left_right": r"\left(", "array_matrix_cases": r"\begin", "operatorname": r"\operatorname",
              "mathcal": r"\mathcal", "hat": r"\hat", "text_mathrm": r"\mathrm"}


def construct_rates(formulas):
    return {name: round(sum(tok in f.split() if not tok.startswith(r"\begin") else tok in f
                            for f in formulas) / len(formulas), 4)
            for name, tok in CONSTRUCTS.items()}


def read_lines(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: corpus {path} not found (the ../shared/data folder beside the "
                         f"repo); pass --corpus FILE")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="formulas to generate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=os.path.join(DATA, "arxiv_display.norm.txt"))
    ap.add_argument("--reference", default=os.path.join(DATA, "im2latex_val.norm.txt"),
                    help="real formulas compared with the corpus the same way, for scale")
    args = ap.parse_args()
    corpus = read_lines(args.corpus)

    wall, cpu = time.perf_counter(), time.process_time()
    formulas = generate(args.n, seed=args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    stats = compare_to_corpus(formulas, corpus)
    out = {
        "n": args.n, "seed": args.seed, "config": "SynthConfig() defaults",
        "max_tokens": SynthConfig.max_tokens,
        "formulas_per_s": round(args.n / wall, 1), "cpu_formulas_per_s": round(args.n / cpu, 1),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "unique": len(set(formulas)) == len(formulas),
        "max_len": max(len(f.split()) for f in formulas),
        **{k: round(v, 4) for k, v in stats.items()},
        "construct_rates": construct_rates(formulas),
        "corpus_construct_rates": construct_rates(corpus),
    }
    if os.path.isfile(args.reference):
        ref = compare_to_corpus(read_lines(args.reference), corpus)
        out["real_reference"] = {"file": os.path.basename(args.reference),
                                 **{k: round(ref[k], 4) for k in
                                    ("js_lengths", "js_tokens", "coverage_top100", "coverage_top300",
                                     "mean_len", "median_len")}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
