"""The shipped reader's quality against CPU-hours of training, one point per training leg.

    .venv/bin/python scripts/quality_curve.py add --minutes M --steps N --metrics metrics.json \
        [--note "..."] [--shipped]          # after a leg (scripts/quality.sh does this)
    .venv/bin/python scripts/quality_curve.py plot                  # -> docs/quality.png

The legs live in models/quality_legs.json (committed beside the model): each leg's training
minutes on the 2-core CPU, its steps, and its best checkpoint's scores on the im2latex val
formulas (greedy, fp32; BLEU, exact match, image match overall and on the multi-line formulas).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pix2tex.fileio import atomic_write_text  # noqa: E402

LEGS = os.path.join(REPO, "models", "quality_legs.json")
PLOT = os.path.join(REPO, "docs", "quality.png")
TARGETS = {"bleu": 0.80, "image_match": 0.40, "multi_line_image_match": 0.25}


def read_legs(path: str = LEGS) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def scores_of(metrics_json: str) -> dict:
    """The figures a leg is judged by, from an eval.py metrics.json made with --image-match."""
    with open(metrics_json, encoding="utf-8") as f:
        m = json.load(f)["metrics"]
    if "image_match" not in m:
        raise ValueError(f"{metrics_json}: no image_match (run eval.py with --image-match)")
    multi = m.get("multi_line", {})
    return {"bleu": m["bleu"], "exact_match": m["exact_match"], "image_match": m["image_match"],
            "multi_line_image_match": multi.get("image_match"), "n": m["n"]}


def add(args) -> None:
    legs = read_legs()
    leg = {"leg": len(legs), "minutes": args.minutes, "steps": args.steps,
           "total_hours": round(sum(x["minutes"] for x in legs) / 60 + args.minutes / 60, 3),
           "im2latex_val": scores_of(args.metrics), "shipped": args.shipped, "note": args.note}
    atomic_write_text(LEGS, json.dumps(legs + [leg], indent=1) + "\n")
    print(f"{LEGS}: leg {leg['leg']} added ({json.dumps(leg['im2latex_val'])})")


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legs = read_legs()
    if not legs:
        raise SystemExit(f"error: {LEGS} has no legs yet")
    hours = [x["total_hours"] for x in legs]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for key, label, color in (("bleu", "BLEU-4", "C0"), ("image_match", "image match", "C1"),
                              ("multi_line_image_match", "image match, multi-line", "C2")):
        ys = [x["im2latex_val"].get(key) for x in legs]
        pts = [(h, y, x.get("shipped", True)) for h, y, x in zip(hours, ys, legs) if y is not None]
        ax.plot([h for h, _, _ in pts], [y for _, y, _ in pts], "-", color=color, label=label)
        for h, y, shipped in pts:  # a leg not shipped: a hollow point
            ax.plot(h, y, "o", color=color, markerfacecolor=color if shipped else "white")
        ax.axhline(TARGETS[key], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training on the 2-core CPU (hours, cumulative)")
    ax.set_ylabel("im2latex val (greedy, fp32)")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(hours) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Reader: quality per CPU-hour (hollow: leg not shipped; dotted: targets)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(PLOT), exist_ok=True)
    tmp = PLOT + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, PLOT)
    print(f"wrote {PLOT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="append a leg")
    a.add_argument("--minutes", type=float, required=True, help="the leg's training minutes")
    a.add_argument("--steps", type=int, required=True, help="the leg's optimizer steps")
    a.add_argument("--metrics", required=True, help="eval.py metrics.json of the leg's best.pth")
    a.add_argument("--shipped", action="store_true", help="this leg's model was released")
    a.add_argument("--note", default="", help="what the leg changed")
    sub.add_parser("plot", help=f"draw {os.path.relpath(PLOT, REPO)}")
    args = ap.parse_args()
    try:
        add(args) if args.command == "add" else plot(args)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
