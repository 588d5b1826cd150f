#!/usr/bin/env bash
# Quality per CPU-hour, and the shipped default model (models/pix2tex.pth): train on the ~159k
# normalized arXiv display formulas, measure on the im2latex-100k validation formulas (held out),
# then write the bf16 release. Not part of CI: about 2.5 hours on a 2-core CPU.
#   SHARED (default ../shared/data), DATA (data/arxiv), STEPS (the config's max_steps),
#   THREADS (torch threads, default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
SHARED=${SHARED:-../shared/data}
DATA=${DATA:-data/arxiv}
CONFIG=settings/config-cpu.yaml
RUN=checkpoints/pix2tex-cpu
export OMP_NUM_THREADS=${THREADS:-$(nproc)}
for f in arxiv_display.norm.txt im2latex_val.norm.txt; do
  [ -f "$SHARED/$f" ] || { echo "error: $SHARED/$f not found (set SHARED=folder with the corpora)" >&2; exit 2; }
done

echo "== 1/4 data: arXiv display formulas (train/val) + im2latex val (test) -> $DATA"
./create_data.sh --formulas "$SHARED/arxiv_display.norm.txt" --test-formulas "$SHARED/im2latex_val.norm.txt" \
  --out "$DATA" --split 0.98,0.02,0 --vocab-size 4000

echo "== 2/4 train $CONFIG (resumes an interrupted run)"
resume=$([ -f "$RUN/last.pth" ] && echo --resume || true)
python -m pix2tex.train --config "$CONFIG" data="$DATA/train.pkl" valdata="$DATA/val.pkl" \
  tokenizer="$DATA/tokenizer.json" ${STEPS:+max_steps=$STEPS} $resume

echo "== 3/4 evaluate on the im2latex validation formulas (greedy, with image match)"
python -m pix2tex.eval --checkpoint "$RUN/best.pth" --data "$DATA/test.pkl" --image-match \
  --output "$RUN/eval_im2latex_val" --no-progress

echo "== 4/4 release: bf16 weights + config + tokenizer -> models/"
python -m pix2tex.release --checkpoint "$RUN/best.pth" --out models
