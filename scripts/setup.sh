#!/usr/bin/env bash
# Idempotent set-up for a fresh Linux machine: TeX from Debian, .venv with the Python deps.
# Called by `make demo` and `make test`; does nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

TEX_PACKAGES="texlive-latex-base texlive-latex-recommended texlive-fonts-recommended dvipng preview-latex-style"
have_tex() {
  command -v latex >/dev/null && command -v dvipng >/dev/null && kpsewhich preview.sty >/dev/null 2>&1
}
if ! have_tex; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing TeX from Debian: $TEX_PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $TEX_PACKAGES >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $TEX_PACKAGES >/dev/null; }
  else
    echo "error: latex, dvipng and preview.sty are needed to render formulas. Install them with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends $TEX_PACKAGES" >&2
    exit 1
  fi
fi

# Headless Chromium and its driver: the browser test of the service's page (tests/test_serve.py).
BROWSER_PACKAGES="chromium chromium-driver"
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing headless Chromium from Debian: $BROWSER_PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends $BROWSER_PACKAGES >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $BROWSER_PACKAGES >/dev/null; }
  else
    echo "warning: the page test (tests/test_serve.py) needs headless Chromium. Install it with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends $BROWSER_PACKAGES" >&2
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
