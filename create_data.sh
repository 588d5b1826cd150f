#!/usr/bin/env bash
# Build a dataset: formulas -> deduplicated train/val/test split -> tokenizer (train split) ->
# rendered images -> dataset pkls. Re-running resumes: finished renders are kept, and a step whose
# command and inputs did not change since it last finished is skipped.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'EOF'
usage: ./create_data.sh [options]
  (no options)          synthetic formulas from dataset_tools/synth.py into data/default
  --formulas FILE...    build from these formula files instead (raw or normalized; normalized first)
  --test-formulas FILE  held-out test split from this file (normalized first) instead of a share of
                        the formulas; its formulas are removed from train/val (--split's third
                        fraction is then ignored). Without --formulas: a test-only set (no
                        train/val), which needs --tokenizer (the model's)
  --out DIR             output folder (default: data/default in the repo)
  --num N               number of synthetic formulas (default 10000)
  --mean-tokens M       synthetic: mean formula length in LaTeX tokens (default 24)
  --max-tokens M        synthetic: longest formula in LaTeX tokens (default 60)
  --split A,B,C         train,val,test fractions (default 0.9,0.05,0.05)
  --dpi LO HI           render resolution range (default 100 130)
  --scale-dpi LO HI     scale augmentation: --scale-share of the formulas rendered at a dpi
                        log-uniform in LO..HI (e.g. 55 460: 0.5x-4x the training scale), and every
                        image brought to the training glyph scale as prediction does (off by default)
  --scale-share P       share of the formulas drawn from --scale-dpi (default 0.4 with --scale-dpi)
  --fonts a,b           LaTeX font packages to draw from (default: the renderer's)
  --vocab-size N        BPE vocabulary size (default 8000)
  --tokenizer FILE      use this tokenizer.json (copied to DIR/tokenizer.json) instead of training
                        one: e.g. models/tokenizer.json to build data for the shipped model
  --workers N           render processes (default: all cores)
  --seed S              seed of generation, split and rendering (default 0)
  --max-seq-len N       longest token sequence kept in the pkls, BOS and EOS included (default 512)
Result: DIR/{train,val,test}.txt, DIR/images/{train,val,test}/, DIR/tokenizer.json,
        DIR/{train,val,test}.pkl, DIR/rejects_*.txt (formulas that failed to normalize or render).
EOF
}

OUT="$REPO/data/default"; NUM=10000; MEAN_TOKENS=24; MAX_TOKENS=60; SPLIT=0.9,0.05,0.05
DPI=(100 130); SCALE_DPI=(); SCALE_SHARE=0.4; FONTS=""; VOCAB=8000; WORKERS=$(nproc 2>/dev/null || echo 2); SEED=0; MAX_SEQ_LEN=512
FILES=(); TEST_FILE=""; TOKENIZER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --formulas) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do FILES+=("$(realpath -m "$1")"); shift; done
                [ ${#FILES[@]} -gt 0 ] || { echo "error: --formulas needs at least one file" >&2; exit 2; }
                continue ;;
    --test-formulas) TEST_FILE="$(realpath -m "$2")"; shift ;;
    --out) OUT="$(realpath -m "$2")"; shift ;;
    --num) NUM=$2; shift ;;
    --mean-tokens) MEAN_TOKENS=$2; shift ;;
    --max-tokens) MAX_TOKENS=$2; shift ;;
    --split) SPLIT=$2; shift ;;
    --dpi) DPI=("$2" "$3"); shift 2 ;;
    --scale-dpi) SCALE_DPI=("$2" "$3"); shift 2 ;;
    --scale-share) SCALE_SHARE=$2; shift ;;
    --fonts) FONTS=$2; shift ;;
    --vocab-size) VOCAB=$2; shift ;;
    --tokenizer) TOKENIZER="$(realpath -m "$2")"; shift ;;
    --workers) WORKERS=$2; shift ;;
    --seed) SEED=$2; shift ;;
    --max-seq-len) MAX_SEQ_LEN=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1' (see ./create_data.sh --help)" >&2; exit 2 ;;
  esac
  shift
done
TEST_ONLY=""
if [ -n "$TEST_FILE" ] && [ ${#FILES[@]} -eq 0 ]; then
  TEST_ONLY=1
  [ -n "$TOKENIZER" ] || { echo "error: --test-formulas without --formulas builds a test-only set: pass the model's tokenizer with --tokenizer FILE (e.g. models/tokenizer.json)" >&2; exit 2; }
fi
for f in "${FILES[@]}" ${TEST_FILE:+"$TEST_FILE"}; do [ -f "$f" ] || { echo "error: formula file not found: $f" >&2; exit 2; }; done
[ -z "$TOKENIZER" ] || [ -f "$TOKENIZER" ] || { echo "error: --tokenizer file not found: $TOKENIZER" >&2; exit 2; }

cd "$REPO"
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT/.stamps"

now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# step NAME OUTPUT INPUT... -- CMD...: run CMD unless OUTPUT exists and the stamp says CMD
# finished on inputs with these contents.
step() {
  local name=$1 output=$2 inputs=() sig t0; shift 2
  while [ "$1" != "--" ]; do inputs+=("$1"); shift; done; shift
  sig="$(printf '%q ' "$@"; cat "${inputs[@]}" /dev/null | sha256sum)"
  if [ -e "$output" ] && [ "$(cat "$OUT/.stamps/$name" 2>/dev/null)" = "$sig" ]; then
    echo "[create_data] $name: up to date"; return
  fi
  echo "[create_data] $name"
  t0=$(now); rm -f "$OUT/.stamps/$name"
  "$@"
  printf '%s' "$sig" > "$OUT/.stamps/$name"
  echo "[create_data] $name: done in $(took "$t0")"
}

T0=$(now)
if [ -n "$TEST_ONLY" ]; then
  : > "$OUT/all.txt"  # nothing to train or validate on
elif [ ${#FILES[@]} -gt 0 ]; then
  step formulas "$OUT/all.txt" "${FILES[@]}" -- "$PY" -m dataset_tools.normalize "${FILES[@]}" -o "$OUT/all.txt" \
    --rejects "$OUT/rejects_normalize.txt"
else
  step formulas "$OUT/all.txt" -- "$PY" -m dataset_tools.synth -n "$NUM" --seed "$SEED" -o "$OUT/all.txt" \
    --mean-tokens "$MEAN_TOKENS" --max-tokens "$MAX_TOKENS"
fi

# Deduplicate, shuffle with the seed, cut into train/val/test. With a held-out file its formulas
# are the test split and none of them is trained or validated on.
SPLIT_PY='
import os, random, sys
src, out, fractions, seed = sys.argv[1:5]
def read(path):
    with open(path, encoding="utf-8") as f:
        return [x for x in dict.fromkeys(" ".join(line.split()) for line in f) if x]
formulas = read(src)
fr = [float(x) for x in fractions.split(",")]
if len(fr) != 3 or min(fr) < 0 or sum(fr) <= 0:
    sys.exit(f"error: --split needs three fractions such as 0.9,0.05,0.05, got {fractions}")
random.Random(int(seed)).shuffle(formulas)
if len(sys.argv) > 5:
    test = read(sys.argv[5])
    if fr[0] + fr[1] <= 0 and formulas:
        sys.exit(f"error: --split {fractions} leaves nothing for train/val besides --test-formulas")
    held_out = set(test)
    kept = [x for x in formulas if x not in held_out]
    print(f"held out {len(test)} test formulas; {len(formulas) - len(kept)} of them removed from train/val")
    a = round(len(kept) * fr[0] / (fr[0] + fr[1]))
    parts = (kept[:a], kept[a:], test)
else:
    a = round(len(formulas) * fr[0] / sum(fr))
    b = a + round(len(formulas) * fr[1] / sum(fr))
    parts = (formulas[:a], formulas[a:b], formulas[b:])
for name, part in zip(("train", "val", "test"), parts):
    with open(f"{out}/{name}.txt.tmp", "w", encoding="utf-8") as f:
        f.writelines(x + "\n" for x in part)
    os.replace(f"{out}/{name}.txt.tmp", f"{out}/{name}.txt")
    print(f"{name}: {len(part)} formulas")
'
if [ -n "$TEST_FILE" ]; then
  step test_formulas "$OUT/held_out.txt" "$TEST_FILE" -- "$PY" -m dataset_tools.normalize "$TEST_FILE" \
    -o "$OUT/held_out.txt" --rejects "$OUT/rejects_normalize_test.txt"
  step split "$OUT/test.txt" "$OUT/all.txt" "$OUT/held_out.txt" -- "$PY" -c "$SPLIT_PY" "$OUT/all.txt" "$OUT" \
    "$SPLIT" "$SEED" "$OUT/held_out.txt"
else
  step split "$OUT/test.txt" "$OUT/all.txt" -- "$PY" -c "$SPLIT_PY" "$OUT/all.txt" "$OUT" "$SPLIT" "$SEED"
fi
if [ -n "$TOKENIZER" ]; then  # a given tokenizer: copied (atomically), so the folder stands alone
  step tokenizer "$OUT/tokenizer.json" "$TOKENIZER" -- "$PY" -c 'import shutil, sys
from pix2tex.dataset.tokenizer import load_tokenizer
load_tokenizer(sys.argv[1])  # a clear error for a file that is not a tokenizer
shutil.copyfile(sys.argv[1], sys.argv[2] + ".tmp"); shutil.move(sys.argv[2] + ".tmp", sys.argv[2])' \
    "$TOKENIZER" "$OUT/tokenizer.json"
else
  step tokenizer "$OUT/tokenizer.json" "$OUT/train.txt" -- "$PY" -m pix2tex.dataset.tokenizer --data "$OUT/train.txt" \
    --vocab-size "$VOCAB" --out "$OUT/tokenizer.json"
fi

listing() { ls -l --time-style=+%s "$OUT/images/$1" 2>/dev/null | sha256sum | cut -c1-64; }
RENDER_ARGS=(--dpi "${DPI[@]}" --seed "$SEED")  # what the images depend on
[ -n "$FONTS" ] && RENDER_ARGS+=(--fonts "$FONTS")
# only when asked: the arguments sign the images, and earlier data sets must stay up to date
[ ${#SCALE_DPI[@]} -eq 0 ] || RENDER_ARGS+=(--scale-dpi "${SCALE_DPI[@]}" --scale-share "$SCALE_SHARE")
SPLITS=(train val test); [ -z "$TEST_ONLY" ] || SPLITS=(test)
for s in "${SPLITS[@]}"; do
  # Images rendered from other formulas or settings are stale: start that split afresh. Otherwise
  # the renderer resumes, drawing only the images that are not there yet.
  sig="$(printf '%q ' "${RENDER_ARGS[@]}"; sha256sum < "$OUT/$s.txt")"
  if [ -f "$OUT/.stamps/render_$s" ] && [ "$(cat "$OUT/.stamps/render_$s")" != "$sig" ]; then
    echo "[create_data] render $s: formulas or settings changed, removing old images"
    rm -rf "$OUT/images/$s" "$OUT/rejects_$s.txt"
  fi
  printf '%s' "$sig" > "$OUT/.stamps/render_$s"
  # Skip the renderer when the folder is as its last complete run left it (it would retry rejects).
  if [ "$(cat "$OUT/.stamps/rendered_$s" 2>/dev/null)" = "$sig $(listing "$s")" ]; then
    echo "[create_data] render $s: up to date"
  else
    echo "[create_data] render $s"
    t0=$(now); rm -f "$OUT/.stamps/rendered_$s"
    "$PY" -m dataset_tools.render "$OUT/$s.txt" -o "$OUT/images/$s" "${RENDER_ARGS[@]}" \
      --workers "$WORKERS" --rejects "$OUT/rejects_$s.txt"
    printf '%s' "$sig $(listing "$s")" > "$OUT/.stamps/rendered_$s"
    echo "[create_data] render $s: done in $(took "$t0")"
  fi
  step "pkl_$s" "$OUT/$s.pkl" "$OUT/$s.txt" "$OUT/tokenizer.json" "$OUT/.stamps/rendered_$s" -- \
    "$PY" -m pix2tex.dataset.dataset --images "$OUT/images/$s" --formulas "$OUT/$s.txt" \
    --tokenizer "$OUT/tokenizer.json" --out "$OUT/$s.pkl" --max-seq-len "$MAX_SEQ_LEN"
done
echo "[create_data] $OUT ready in $(took "$T0"): $(printf '%s.pkl ' "${SPLITS[@]}")tokenizer.json"
