"""Benchmark of dataset_tools.render: formulas/s and failure rate on real formulas.

    .venv/bin/python bench/render.py [--data FILE] [--limit N] [--workers 2]

Prints one JSON object. Wall-clock throughput depends on what else runs on the machine, so the
load average is reported and so is the CPU time (this process and every child: latex, dvipng,
workers): `cpu_bound_formulas_per_s` = formulas / (CPU seconds / workers) is what the same work
would reach on `workers` idle cores. `timings` are summed over workers: latex, dvipng and the
Python crop/pad/save of each image.
"""
import argparse
import collections
import json
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataset_tools.render import (DEFAULT_DPI_STEP, available_fonts, choose_style,  # noqa: E402
                                  read_formulas, render_formulas)


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "im2latex_val.norm.txt"))
    ap.add_argument("--limit", type=int, default=0, help="first N formulas (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpi-step", type=int, default=None)
    args = ap.parse_args()

    formulas = read_formulas(args.data)
    if args.limit:
        formulas = formulas[:args.limit]
    kwargs = {"batch_size": args.batch_size} if args.batch_size else {}
    if args.dpi_step:
        kwargs["dpi_step"] = args.dpi_step
    load_before = os.getloadavg()
    cpu0 = cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="bench-render-") as out:
        res = render_formulas(formulas, out, workers=args.workers, seed=args.seed, progress=False,
                              **kwargs)
        sizes = [os.path.getsize(p) for p in res.rendered.values()]
    cpu = cpu_seconds() - cpu0
    load_after = os.getloadavg()

    fonts = available_fonts()
    step = kwargs.get("dpi_step", DEFAULT_DPI_STEP)
    per_font = collections.Counter(choose_style(i, args.seed, (110, 180), fonts, step)[0]
                                   for i in res.rejected)
    reasons = collections.Counter(r.split(" [at:")[0] for r in res.rejected.values())
    n = res.attempted
    extra = res.timings["latex_runs"] - res.timings["batches"]
    print(json.dumps({
        "data": os.path.basename(args.data),
        "formulas": n,
        "workers": args.workers,
        "dpi_step": kwargs.get("dpi_step", DEFAULT_DPI_STEP),
        "rendered": n - len(res.rejected),
        "rejected": len(res.rejected),
        "failure_rate_pct": round(100 * res.failure_rate, 3),
        "seconds": round(res.seconds, 2),
        "formulas_per_s": round(res.formulas_per_s, 1),
        "cpu_seconds": round(cpu, 2),
        "cpu_bound_formulas_per_s": round(n / (cpu / args.workers), 1) if cpu > 0 else None,
        "timings": {k: round(v, 2) for k, v in res.timings.items()},
        # latex runs beyond one per batch (the rest of a batch after an error that changed TeX's
        # state, a runaway formula alone, bisection after a timeout) and their share of the CPU
        "extra_latex_runs": int(extra),
        "extra_latex_runs_cpu_pct": round(100 * extra * res.timings["latex_cpu"]
                                          / max(res.timings["latex_runs"], 1) / cpu, 2) if cpu > 0 else None,
        "cpu_ms_per_formula": {k[:-4]: round(1000 * res.timings[k] / n, 3)
                               for k in ("latex_cpu", "dvipng_cpu", "post_cpu")} if n else {},
        "mean_png_bytes": round(sum(sizes) / len(sizes)) if sizes else 0,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "rejects_by_drawn_font": dict(per_font),  # failed in that font (and in cm, the fallback)
        "top_reject_reasons": dict(reasons.most_common(8)),
    }))


if __name__ == "__main__":
    main()
