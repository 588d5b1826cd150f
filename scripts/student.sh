#!/usr/bin/env bash
# One training leg of the shipped student (models/pix2tex-small.pth, `pix2tex --model small`):
# settings/distill/student-cpu.yaml distilled from the shipped reader (models/pix2tex.pth) with
# the recipe RECIPE (default target_soft: ground truth + the teacher's soft targets, which need
# no pseudo-label pass over the 244k training formulas), then its measure on the im2latex-100k
# validation formulas (held out) and, when that improved, its release. Like the reader, the
# student is trained in legs of one session each: the first leg starts from the shipped student
# when there is one (else from the teacher's weights by weight selection: at step 1,000 it had
# the validation loss a random start reached after ~2,500), every later one resumes the run
# folder and adds LEG_STEPS (one cosine cycle, each cycle's peak 0.9x the one before). Run it alone
# on the machine.
#   SHARED, DATA (data/mix), TEST (data/im2latex_val), SYNTH_MULTILINE: as scripts/mix_data.sh;
#   RECIPE (an experiment of settings/distill/), LEG_STEPS (default 9000: ~110 minutes here), THREADS,
#   RELEASE=0 to measure without releasing, TRAIN_OVERRIDES (extra key=value overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
DATA=${DATA:-data/mix}
TEST=${TEST:-data/im2latex_val}
RECIPE=${RECIPE:-target_soft}
LEG_STEPS=${LEG_STEPS:-9000}
RUN=checkpoints/pix2tex-small
SHIPPED_WEIGHTS=models/pix2tex-small.pth
SHIPPED=models/pix2tex-small.im2latex_val.json  # the shipped student's figures, committed beside it
export OMP_NUM_THREADS=${THREADS:-$(nproc)}

echo "== 1/4 data (scripts/mix_data.sh) -> $DATA, $TEST"
DATA="$DATA" TEST="$TEST" bash scripts/mix_data.sh

echo "== 2/4 distill settings/distill/$RECIPE.yaml into settings/distill/student-cpu.yaml: $LEG_STEPS steps"
args=(--config "settings/distill/$RECIPE.yaml" --student settings/distill/student-cpu.yaml --no-eval
      data="$DATA/train.pkl" valdata="$DATA/val.pkl" tokenizer="$DATA/tokenizer.json"
      model_path=checkpoints name=pix2tex-small
      scheduler.cycle_steps="$LEG_STEPS" scheduler.cycle_decay=0.9 ${TRAIN_OVERRIDES:-})
step_of() { python -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=False)["step"])' "$1"; }
step=0
t0=$(date +%s)
if [ -f "$RUN/last.pth" ]; then
  step=$(step_of "$RUN/last.pth")
  python -m pix2tex.distill "${args[@]}" max_steps=$((step + LEG_STEPS)) --resume
elif [ -f "$SHIPPED_WEIGHTS" ]; then  # the run folder is gone: warm start from the shipped student
  python -m pix2tex.distill "${args[@]}" max_steps="$LEG_STEPS" load_ckpt="$SHIPPED_WEIGHTS"
else  # a fresh run starts inside the teacher (weight selection), not at random
  python -m pix2tex.distill "${args[@]}" max_steps="$LEG_STEPS" distill.init_from_teacher=true
fi
minutes=$(( ($(date +%s) - t0) / 60 ))

echo "== 3/4 evaluate the leg's end (annealed) on the im2latex val formulas (greedy, fp32)"
student=$(python -c 'import sys; from pix2tex.distill.main import export_student
print(export_student(sys.argv[1], "models/pix2tex.pth", which="last"))' "$RUN")
python -m pix2tex.eval --checkpoint "$student" --data "$TEST/test.pkl" --image-match \
  --output "$RUN/eval_im2latex_val" --no-progress

echo "== 4/4 release it as $SHIPPED_WEIGHTS if its im2latex val BLEU beats the shipped student's"
better=$(python -c 'import json, os, sys
new = json.load(open(sys.argv[1]))["metrics"]["bleu"]
old = json.load(open(sys.argv[2]))["metrics"]["bleu"] if os.path.isfile(sys.argv[2]) else None
print(int(old is None or new > old)); print(f"im2latex val BLEU: this leg {new:.4f}, shipped {old}", file=sys.stderr)' \
  "$RUN/eval_im2latex_val/metrics.json" "$SHIPPED")
if [ "$better" = 1 ] && [ "${RELEASE:-1}" = 1 ]; then
  python -m pix2tex.release --checkpoint "$student" --out models --name pix2tex-small.pth --no-onnx
  cp "$RUN/eval_im2latex_val/metrics.json" "$SHIPPED"
else
  echo "not released (RELEASE=${RELEASE:-1}, better=$better)"
fi
echo "leg: $minutes training minutes, steps $step -> $(step_of "$RUN/last.pth")"
