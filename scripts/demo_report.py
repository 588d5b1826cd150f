"""Print the demo's closing report from the files the steps wrote."""
import argparse
import json
import os

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--runs", required=True)
p.add_argument("--image", required=True)
p.add_argument("--seconds", type=int, default=0)
args = p.parse_args()

teacher = json.load(open(os.path.join(args.runs, "teacher", "eval", "metrics.json")))
metrics = teacher.get("metrics", teacher)
comparison = json.load(open(os.path.join(args.runs, "student", "student", "comparison.json")))["results"]
prediction = json.loads(open(os.path.join(args.runs, "prediction.jsonl")).readline())
index = int(os.path.splitext(os.path.basename(args.image))[0])
truth = open(os.path.join(args.data, "test.txt"), encoding="utf-8").read().splitlines()[index]

print("\n================ pix2tex demo report ================")
print(f"wall time: {args.seconds // 60} min {args.seconds % 60} s")
print(f"teacher on the synthetic test split ({metrics['n']} formulas, greedy): "
      f"exact match {metrics['exact_match']:.3f}, BLEU {metrics['bleu']:.3f}, "
      f"edit distance {metrics['edit_distance']:.3f}, token accuracy {metrics['token_accuracy']:.3f}")
print("\nteacher vs distilled student (test split):")
print(f"{'model':<10}{'params':>10}{'BLEU':>8}{'exact':>8}{'ms/formula':>12}")
for name, r in comparison.items():
    print(f"{name:<10}{r['params'] / 1e6:>9.2f}M{r['bleu']:>8.3f}{r['exact_match']:>8.3f}{r['decode_ms']:>12.1f}")
t, s = comparison["teacher"], comparison["student"]
print(f"student: {s['params'] / t['params']:.2f}x the parameters, "
      f"{t['decode_ms'] / s['decode_ms']:.1f}x faster decoding")
print(f"\nCLI on {args.image}:\n  predicted: {prediction['latex']}\n  truth:     {truth}")
print(f"\ncheckpoints: teacher {args.runs}/teacher/best.pth, "
      f"student {args.runs}/student/student/best.pth")
print(f"data: {args.data} (train/val/test pkls, tokenizer.json, images/)")
