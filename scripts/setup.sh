#!/usr/bin/env bash
# Idempotent set-up for a fresh Linux machine: TeX from Debian, .venv with the Python deps.
# Called by `make demo` and `make test`; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# apt_install WHAT "PACKAGES" error|warning: install Debian packages when root, else print the
# exact command (and stop, for an error).
apt_install() {
  local what=$1 packages=$2 severity=$3
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing $what from Debian: $packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $packages >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $packages >/dev/null; }
  else
    echo "$severity: $what is needed. Install it with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends $packages" >&2
    [ "$severity" != error ] || exit 1
  fi
}

# latex, dvipng and preview.sty render formulas.
if ! { command -v latex >/dev/null && command -v dvipng >/dev/null && kpsewhich preview.sty >/dev/null 2>&1; }; then
  apt_install "TeX (latex, dvipng, preview.sty)" \
    "texlive-latex-base texlive-latex-recommended texlive-fonts-recommended dvipng preview-latex-style" error
fi
# Headless Chromium and its driver: the browser test of the service's page (tests/test_serve.py).
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  apt_install "headless Chromium (for tests/test_serve.py's page test)" "chromium chromium-driver" warning
fi

# MathJax 3 (npm mathjax-full, package.json): a renderer of bench/screenshots.py.
if [ ! -f node_modules/mathjax-full/es5/tex-svg-full.js ]; then
  if command -v npm >/dev/null; then
    echo "[setup] installing MathJax (npm, package.json) into node_modules/"
    npm install --no-audit --no-fund --silent >/dev/null \
      || echo "warning: npm install failed: bench/screenshots.py will lack MathJax" >&2
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt_install "npm (MathJax for bench/screenshots.py)" "npm" warning
    if command -v npm >/dev/null; then npm install --no-audit --no-fund --silent >/dev/null || true; fi
  else
    echo "warning: npm is needed for MathJax (bench/screenshots.py): sudo apt-get install -y npm" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python dependencies into .venv (a few minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
  # torch + torchvision from PyPI together: a consistent pair (the CPU-only torch wheel some
  # machines carry locally has no matching torchvision).
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
