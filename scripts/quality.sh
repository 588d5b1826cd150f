#!/usr/bin/env bash
# One training leg of the shipped default model (models/pix2tex.pth), then its measure on the
# im2latex-100k validation formulas (held out) and, when that improved, the bf16 release.
# The run is trained in legs of one session each (README "The default model"): the first leg
# starts from the shipped weights (or from scratch with FROM_SCRATCH=1), every later one resumes
# the run folder and adds LEG_STEPS (whole LR cycles of settings/config-cpu.yaml). Run it alone on
# the machine: a second busy process slows training severalfold.
#   SHARED, SCALE_DPI (as scripts/mix_data.sh), DATA (data/mix), TEST (data/im2latex_val),
#   LEG_STEPS (default 5000: one cycle, ~100 min here), THREADS (torch threads, default all cores),
#   RELEASE=0 to measure without releasing, LEG_NOTE (what the leg changed, for the curve),
#   SYNTH_MULTILINE (synthetic multi-line formulas in the mix, default 90000 as in leg 6; another number
#   changes train and val: the run's best metric then starts afresh on the new val set),
#   TRAIN_OVERRIDES (extra dotted key=value overrides for the training command, e.g. a warm
#   start's optimizer.lr at the decayed peak the resumed run would have reached).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
DATA=${DATA:-data/mix}
TEST=${TEST:-data/im2latex_val}
LEG_STEPS=${LEG_STEPS:-5000}
CONFIG=settings/config-cpu.yaml
RUN=checkpoints/pix2tex-cpu
export OMP_NUM_THREADS=${THREADS:-$(nproc)}

echo "== 1/4 data (scripts/mix_data.sh): arXiv display + Wikipedia + synthetic multi-line formulas"
echo "   (train/val) -> $DATA; im2latex val (test, 100-130 dpi like every earlier measure) -> $TEST"
DATA="$DATA" TEST="$TEST" bash scripts/mix_data.sh  # SHARED, SYNTH_MULTILINE, SCALE_DPI: from the environment

echo "== 2/4 train $CONFIG: one leg of $LEG_STEPS steps"
data_args=(data="$DATA/train.pkl" valdata="$DATA/val.pkl" tokenizer="$DATA/tokenizer.json" ${TRAIN_OVERRIDES:-})
step_of() { python -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=False)["step"])' "$1"; }
step=0
t0=$(date +%s)
if [ -f "$RUN/last.pth" ]; then
  step=$(step_of "$RUN/last.pth")
  python -m pix2tex.train --config "$CONFIG" "${data_args[@]}" max_steps=$((step + LEG_STEPS)) --resume
elif [ "${FROM_SCRATCH:-0}" = 1 ]; then
  python -m pix2tex.train --config "$CONFIG" "${data_args[@]}" max_steps="$LEG_STEPS"
else  # warm start: the shipped weights, a fresh optimizer and schedule
  python -m pix2tex.train --config "$CONFIG" "${data_args[@]}" max_steps="$LEG_STEPS" \
    load_ckpt=models/pix2tex.pth
fi

minutes=$(( ($(date +%s) - t0) / 60 ))
steps=$(( $(step_of "$RUN/last.pth") - step ))

# The leg's end, not best.pth: every leg ends its cosine cycle annealed, and best.pth is picked on
# a validation of ~180 formulas whose noise exceeds the gains late in a cycle (leg 6: best.pth was
# step 3,000 of 5,000, im2latex val BLEU 0.817 against the annealed end's 0.828).
echo "== 3/4 evaluate last.pth (and the shipped model, once) on the im2latex val formulas (greedy, fp32)"
python -m pix2tex.eval --checkpoint "$RUN/last.pth" --data "$TEST/test.pkl" --image-match \
  --output "$RUN/eval_im2latex_val" --no-progress
SHIPPED=models/pix2tex.im2latex_val.json  # the shipped model's figures, committed beside it
if [ ! -f "$SHIPPED" ]; then
  python -m pix2tex.eval --checkpoint models/pix2tex.pth --data "$TEST/test.pkl" --image-match \
    --output "$RUN/eval_shipped" --no-progress
  cp "$RUN/eval_shipped/metrics.json" "$SHIPPED"
fi

echo "== 4/4 release last.pth to models/ (torch) and pix2tex/released/ (ONNX) if its im2latex val BLEU beats the shipped model's"
better=$(python -c 'import json, sys
new, old = (json.load(open(p))["metrics"]["bleu"] for p in sys.argv[1:])
print(int(new > old)); print(f"im2latex val BLEU: this leg {new:.4f}, shipped {old:.4f}", file=sys.stderr)' \
  "$RUN/eval_im2latex_val/metrics.json" "$SHIPPED")
shipped=()
if [ "$better" = 1 ] && [ "${RELEASE:-1}" = 1 ]; then
  python -m pix2tex.release --checkpoint "$RUN/last.pth" --out models --onnx-out pix2tex/released
  cp "$RUN/eval_im2latex_val/metrics.json" "$SHIPPED"
  shipped=(--shipped)
else
  echo "not released (RELEASE=${RELEASE:-1}, better=$better)"
fi
# the quality curve: this leg's point (models/quality_legs.json) and docs/quality.png
python scripts/quality_curve.py add --minutes "$minutes" --steps "$steps" \
  --metrics "$RUN/eval_im2latex_val/metrics.json" "${shipped[@]}" --note "${LEG_NOTE:-}"
python scripts/quality_curve.py plot
