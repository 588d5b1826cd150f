#!/usr/bin/env bash
# The main job on its embedded default (no files from outside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
./create_data.sh --out data/demo
