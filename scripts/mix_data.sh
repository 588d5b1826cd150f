#!/usr/bin/env bash
# The data of the shipped models (the reader, scripts/quality.sh, and its student,
# scripts/student.sh): arXiv display + Wikipedia + synthetic multi-line formulas rendered at
# 95-140 dpi with the shipped tokenizer (train/val) -> $DATA, and the im2latex-100k validation
# formulas at 100-130 dpi (the held-out measure: test only) -> $TEST. Resumable: create_data.sh
# skips what is already built.
#   SHARED (default ../shared/data), DATA (data/mix), TEST (data/im2latex_val),
#   SYNTH_MULTILINE (synthetic formulas with rows, default 90000 as in leg 6; another number
#   changes train and val), SCALE_DPI ("LO HI": scale augmentation of train/val, create_data.sh
#   --scale-dpi, with SCALE_SHARE, default 0.4; off by default, as the shipped models were
#   trained; build it into another DATA folder)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
SHARED=${SHARED:-../shared/data}
DATA=${DATA:-data/mix}
TEST=${TEST:-data/im2latex_val}
SYNTH_MULTILINE=${SYNTH_MULTILINE:-90000}
scale_args=()
[ -z "${SCALE_DPI:-}" ] || scale_args=(--scale-dpi $SCALE_DPI --scale-share "${SCALE_SHARE:-0.4}")
for f in arxiv_display.norm.txt wikipedia_math.raw.txt im2latex_val.norm.txt; do
  [ -f "$SHARED/$f" ] || { echo "error: $SHARED/$f not found (set SHARED=folder with the corpora)" >&2; exit 2; }
done
mkdir -p "$DATA"
python -m dataset_tools.synth -n "$SYNTH_MULTILINE" --seed 1 -o "$DATA/synth_multiline.txt" \
  --set w_matrix=10 w_cases=6 p_aligned=0.25
./create_data.sh --formulas "$SHARED/arxiv_display.norm.txt" "$SHARED/wikipedia_math.raw.txt" \
  "$DATA/synth_multiline.txt" --test-formulas "$SHARED/im2latex_val.norm.txt" \
  --tokenizer models/tokenizer.json --out "$DATA" --split 0.98,0.02,0 --dpi 95 140 "${scale_args[@]}"
./create_data.sh --test-formulas "$SHARED/im2latex_val.norm.txt" --tokenizer models/tokenizer.json \
  --out "$TEST"
