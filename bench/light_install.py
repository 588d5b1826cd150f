#!/usr/bin/env python
"""The inference-only install, proved from scratch: a fresh venv, `pip install` of this checkout's
core package (no torch), then one rendered formula read with the CLI, the Python API and the
service, beside the research install's torch path.

    .venv/bin/python bench/light_install.py [--image formula.png] [--no-serve] [--keep DIR]

Measures the core venv's size and install time, the cold `pix2tex IMAGE` (a new process each time:
imports, model load, one decode) wall time and peak RSS for the core install (ONNX) and for the
research .venv with `--backend torch`, and checks that every path reads the same LaTeX and that
torch cannot even be imported in the core venv. Prints one JSON object; targets: core venv
< 300 MB, cold CLI < 1 s and < 300 MB RSS. pip needs the package index (or its cache).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"venv_mb": 300, "cold_cli_s": 1.0, "cold_cli_rss_mb": 300}
# what the package build needs from the checkout (not data, runs, weights of research, .git)
SOURCES = ("pyproject.toml", "README.md", "pix2tex", "dataset_tools")


def run(cmd, **kw) -> tuple[subprocess.CompletedProcess, float, float]:
    """(result, wall seconds, peak RSS MB of the process) for one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    result = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out, err)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{err[-3000:]}")
    return result, wall, usage.ru_maxrss / 1024


def folder_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total / 2**20


def render_formula(out_dir: str) -> str:
    sys.path.insert(0, REPO)
    from dataset_tools.render import render_formulas

    res = render_formulas([r"\frac { a ^ { 2 } } { b + c }"], out_dir, dpi=120, fonts=["cm"],
                          progress=False)
    return res.rendered[0]


def install_core(work: str) -> tuple[str, list[str], dict]:
    """A fresh venv with the core package from a copy of the checkout's sources: (venv folder,
    its pip install command, {install_s, venv_mb})."""
    src, venv = os.path.join(work, "src"), os.path.join(work, "venv")
    os.makedirs(src, exist_ok=True)
    for name in SOURCES:
        if os.path.isdir(os.path.join(REPO, name)):
            shutil.copytree(os.path.join(REPO, name), os.path.join(src, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(os.path.join(REPO, name), os.path.join(src, name))
    t0 = time.perf_counter()
    run([sys.executable, "-m", "venv", venv])
    pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
           "--disable-pip-version-check"]
    run([*pip, src])
    seconds = time.perf_counter() - t0
    return venv, pip, {"install_s": round(seconds, 1), "venv_mb": round(folder_mb(venv), 1)}


def cold_cli(cmd: list[str], repeats: int, env: dict) -> dict:
    walls, rss, text = [], [], None
    for _ in range(repeats):
        result, wall, peak = run(cmd, env=env)
        walls.append(wall)
        rss.append(peak)
        text = result.stdout.strip()
    return {"latex": text, "cold_s": round(statistics.median(walls), 3),
            "rss_mb": round(max(rss), 1), "runs": repeats}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(venv: str, image: str, env: dict) -> str:
    """Start pix2tex-serve from the core venv, POST the image to /predict, stop it."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(venv, "bin", "pix2tex-serve"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"pix2tex-serve stopped: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.1)
        boundary = uuid.uuid4().hex
        with open(image, "rb") as f:
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                    f"filename=\"f.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + f.read() + \
                f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(url + "/predict", data=body, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())["latex"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", help="a formula image (default: one rendered here)")
    p.add_argument("--repeats", type=int, default=3, help="cold CLI runs per install (median)")
    p.add_argument("--no-serve", action="store_true", help="skip the service (and its extra)")
    p.add_argument("--keep", help="build the venv in this folder and keep it")
    a = p.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="pix2tex-light-")
    os.makedirs(work, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PIX2TEX_CHECKPOINT", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", str(os.cpu_count()))
    try:
        image = a.image or render_formula(os.path.join(work, "image"))
        venv, pip, core = install_core(work)
        py = os.path.join(venv, "bin", "python")
        torch_importable = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
        onnx = cold_cli([os.path.join(venv, "bin", "pix2tex"), image], a.repeats, env)
        api = run([py, "-c", "import sys; from pix2tex import LatexOCR; print(LatexOCR()(sys.argv[1]))",
                   image], env=env)[0].stdout.strip()
        torch_path = cold_cli([sys.executable, "-m", "pix2tex.predict", "--backend", "torch",
                               "--device", "cpu", image], a.repeats, {**env, "PYTHONPATH": REPO})
        report = {"image": image, "core": {**core, "torch_importable": torch_importable},
                  "cli_onnx_core_venv": onnx, "api_core_venv": api, "cli_torch_research_venv": torch_path,
                  "research_venv_mb": round(folder_mb(os.path.join(REPO, ".venv")), 1)}
        if not a.no_serve:
            t0 = time.perf_counter()
            run([*pip, "fastapi", "uvicorn", "python-multipart"])  # the serve extra's packages
            report["serve"] = {"latex": serve_once(venv, image, env),
                               "install_s": round(time.perf_counter() - t0, 1),
                               "venv_mb": round(folder_mb(venv), 1)}
        texts = [onnx["latex"], api] + ([report["serve"]["latex"]] if "serve" in report else [])
        report["same_latex_everywhere"] = len(set(texts)) == 1 and texts[0] != ""
        report["same_as_torch_default_precision"] = onnx["latex"] == torch_path["latex"]
        report["targets"] = TARGETS
        report["meets_targets"] = (core["venv_mb"] < TARGETS["venv_mb"]
                                   and onnx["cold_s"] < TARGETS["cold_cli_s"]
                                   and onnx["rss_mb"] < TARGETS["cold_cli_rss_mb"]
                                   and not torch_importable and report["same_latex_everywhere"])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
