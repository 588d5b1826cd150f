#!/usr/bin/env python
"""Screenshots at any scale: im2latex val formulas drawn by other renderers, read by a model.

    .venv/bin/python bench/screenshots.py [--num 200] [--checkpoint CKPT] [--backend auto]
        [--renderers own,tex,katex,mathjax] [--keep DIR]

The same formulas (a seeded sample of ../shared/data/im2latex_val.norm.txt: never trained on) are
drawn by
  own      our training renderer at 100-130 dpi (how the im2latex measure of the README is drawn)
  tex      TeX at 150, 300 and 600 dpi (a PDF viewer at 150-600% zoom), Computer Modern
  katex    KaTeX (the service page's vendored copy) in headless Chromium, display mode at the
           browser's default 16 px font, screenshotted at device scale 1, 1.25, 1.5, 2 and 3
  mathjax  MathJax 3 SVG output (npm mathjax-full, installed by scripts/setup.sh) in the same
           browser at 14, 20, 28 and 40 px per em
and read by the model (default: the shipped one) through `LatexOCR` (its preprocessing normalizes
the glyph scale). Per renderer and scale: BLEU, exact match and image match (eval's metric) on the
formulas that renderer could draw, and the own renders' BLEU on the same formulas; the target is
every renderer and scale within 0.03 BLEU of it. Prints one JSON object.

With --keep DIR the images stay in DIR/<renderer><setting>/ (own, tex300, katex1.5, mathjax14,
...) beside DIR/<folder>.references.txt, their formulas in file-name order, so that any setting
can be read again with other options, e.g. render-and-compare reranking:
    .venv/bin/python -m pix2tex.eval --images DIR/katex2 --references DIR/katex2.references.txt --rerank 5
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FORMULAS = os.path.join(os.path.dirname(REPO), "shared", "data", "im2latex_val.norm.txt")
KATEX = os.path.join(REPO, "pix2tex", "static", "katex")
MATHJAX = os.path.join(REPO, "node_modules", "mathjax-full", "es5")
TEX_DPI = (150, 300, 600)
KATEX_SCALES = (1, 1.25, 1.5, 2, 3)
MATHJAX_PX = (14, 20, 28, 40)
TARGET_BLEU_GAP = 0.03

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="katex/katex.min.css"><script src="katex/katex.min.js"></script>
<script>window.MathJax = {startup: {typeset: false}, svg: {fontCache: "none"}};</script>
<script src="mathjax/tex-svg-full.js"></script>
<style>body { margin: 0; background: #fff; color: #000; font-size: 16px }
#box { display: inline-block; padding: 12px; background: #fff }</style>
</head><body><div id="box"></div></body></html>"""

DRAW_KATEX = """const [tex, done] = arguments, box = document.getElementById("box");
box.style.fontSize = "16px";
try { katex.render(tex, box, {displayMode: true, throwOnError: true}); }
catch (e) { box.innerHTML = ""; done(String(e)); return; }
document.fonts.ready.then(() => done(null));"""

DRAW_MATHJAX = """const [tex, px, done] = arguments, box = document.getElementById("box");
MathJax.startup.promise.then(() => {
  box.style.fontSize = px + "px"; box.innerHTML = "";
  const node = MathJax.tex2svg(tex, {display: true});
  const err = node.querySelector("[data-mjx-error]");
  if (err) { done("MathJax: " + err.getAttribute("data-mjx-error")); return; }
  // the assistive MathML copy is hidden by MathJax's page stylesheet, which tex2svg alone does
  // not add: without this the screenshot holds the formula twice
  node.querySelectorAll("mjx-assistive-mml").forEach(n => n.remove());
  box.appendChild(node); done(null);
});"""


def sample_formulas(n: int, seed: int = 0) -> list[str]:
    if not os.path.isfile(FORMULAS):
        raise SystemExit(f"error: {FORMULAS} not found (the shared corpora, see ../shared/data)")
    with open(FORMULAS, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    picked = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    return [lines[i] for i in picked]


# --- drawing -------------------------------------------------------------------------------------

def draw_tex(formulas, out_dir, dpi, fonts=None) -> dict[int, str]:
    from dataset_tools.render import render_formulas

    return render_formulas(formulas, out_dir, dpi=dpi, fonts=fonts, progress=False).rendered


class Browser:
    """Headless Chromium on a page that has KaTeX and MathJax, served from a local folder."""

    def __init__(self, work: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        site = os.path.join(work, "site")
        os.makedirs(site, exist_ok=True)
        with open(os.path.join(site, "index.html"), "w", encoding="utf-8") as f:
            f.write(PAGE)
        for target, name in ((KATEX, "katex"), (MATHJAX, "mathjax")):
            link = os.path.join(site, name)
            if os.path.islink(link):  # --keep DIR of an earlier run
                os.remove(link)
            os.symlink(target, link)
        handler = functools.partial(Quiet, directory=site)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars"):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
        self.driver.set_script_timeout(30)
        self.driver.get(f"http://127.0.0.1:{self.server.server_address[1]}/index.html")

    def scale(self, factor: float) -> None:
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 2400, "height": 1600, "deviceScaleFactor": factor, "mobile": False})

    def shoot(self, script: str, args: list, path: str) -> str | None:
        """Draw one formula with `script`; its screenshot to `path`, or the renderer's error."""
        from selenium.webdriver.common.by import By

        error = self.driver.execute_async_script(script, *args)
        if error:
            return error
        self.driver.find_element(By.ID, "box").screenshot(path)
        return None

    def close(self):
        self.driver.quit()
        self.server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def draw_browser(browser, formulas, out_dir, kind, setting) -> tuple[dict[int, str], dict[int, str]]:
    os.makedirs(out_dir, exist_ok=True)
    drawn, errors = {}, {}
    browser.scale(setting if kind == "katex" else 1)
    for i, tex in enumerate(formulas):
        path = os.path.join(out_dir, f"{i:07d}.png")
        args = [tex] if kind == "katex" else [tex, setting]
        error = browser.shoot(DRAW_KATEX if kind == "katex" else DRAW_MATHJAX, args, path)
        if error:
            errors[i] = error[:200]
        else:
            drawn[i] = path
    return drawn, errors


def write_references(path: str, formulas: list[str]) -> None:
    """One formula per line, in the order of the drawn images' names (eval.py --references)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{formula}\n" for formula in formulas)


# --- reading and scoring -------------------------------------------------------------------------

def read_all(ocr, paths: list[str]) -> list[str]:
    from pix2tex.preprocess import ImageError

    pages = []
    for path in paths:
        try:
            pages.append(ocr.preprocess(path))
        except ImageError:
            pages.append(None)  # read as "": scored as a miss, not dropped
    return ocr.recognize(pages)


def score(preds, refs, render_dir) -> dict:
    from pix2tex.metrics import compute_metrics

    shutil.rmtree(render_dir, ignore_errors=True)  # --keep DIR of an earlier run: its renders go
    m = compute_metrics(preds, refs, image_match=True, render_dir=render_dir)
    return {k: round(m[k], 4) for k in ("bleu", "exact_match", "image_match")} | {"n": m["n"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=200, help="formulas (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="model (default: the shipped one)")
    p.add_argument("--backend", default="auto", help="auto | onnx | torch")
    p.add_argument("--renderers", default="own,tex,katex,mathjax")
    p.add_argument("--keep", help="keep the images and renders in this folder")
    a = p.parse_args()
    renderers = a.renderers.split(",")
    if "mathjax" in renderers and not os.path.isfile(os.path.join(MATHJAX, "tex-svg-full.js")):
        raise SystemExit(f"error: MathJax not found at {MATHJAX}: run `bash scripts/setup.sh` (npm "
                         f"install of mathjax-full) or leave mathjax out of --renderers")
    from pix2tex.predict import LatexOCR, quiet_third_party_warnings

    quiet_third_party_warnings()
    work = a.keep or tempfile.mkdtemp(prefix="pix2tex-screenshots-")
    os.makedirs(work, exist_ok=True)
    formulas = sample_formulas(a.num, a.seed)
    ocr = LatexOCR(a.checkpoint, backend=a.backend)
    t0 = time.time()
    # (renderer, setting) -> {formula index: image}, plus the renderer's errors
    groups: dict[tuple[str, object], dict[int, str]] = {}
    folders: dict[tuple[str, object], str] = {}
    rejects: dict[str, int] = {}
    try:
        folders[("own", "100-130 dpi")] = "own"
        groups[("own", "100-130 dpi")] = draw_tex(formulas, os.path.join(work, "own"), (100, 130))
        if "tex" in renderers:
            for dpi in TEX_DPI:
                folders[("tex", f"{dpi} dpi")] = f"tex{dpi}"
                groups[("tex", f"{dpi} dpi")] = draw_tex(formulas, os.path.join(work, f"tex{dpi}"),
                                                          (dpi, dpi), fonts=["cm"])
        browser_kinds = [k for k in ("katex", "mathjax") if k in renderers]
        if browser_kinds:
            browser = Browser(work)
            try:
                for kind in browser_kinds:
                    for setting in (KATEX_SCALES if kind == "katex" else MATHJAX_PX):
                        label = f"scale {setting}" if kind == "katex" else f"{setting} px/em"
                        drawn, errors = draw_browser(browser, formulas,
                                                     os.path.join(work, f"{kind}{setting}"), kind, setting)
                        groups[(kind, label)] = drawn
                        folders[(kind, label)] = f"{kind}{setting}"
                        rejects[f"{kind} {label}"] = len(errors)
            finally:
                browser.close()
        if a.keep:
            for key, drawn in groups.items():
                write_references(os.path.join(work, f"{folders[key]}.references.txt"),
                                 [formulas[i] for i in sorted(drawn)])
        draw_s = time.time() - t0
        preds = {key: dict(zip(drawn, read_all(ocr, list(drawn.values()))))
                 for key, drawn in groups.items()}
        own = preds[("own", "100-130 dpi")]
        from pix2tex.metrics import bleu
        rows = []
        for n, ((kind, label), got) in enumerate(preds.items()):
            idx = [i for i in got if i in own]  # formulas both this renderer and ours drew
            refs = [formulas[i] for i in idx]
            row = {"renderer": kind, "setting": label, "drawn": len(got),
                   **score([got[i] for i in idx], refs, os.path.join(work, f"match{n}"))}
            row["own_bleu_same_formulas"] = round(bleu([own[i] for i in idx], refs), 4)
            row["bleu_gap"] = round(row["own_bleu_same_formulas"] - row["bleu"], 4)
            rows.append(row)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "formulas": len(formulas), "source": os.path.relpath(FORMULAS, REPO), "seed": a.seed,
        "model": os.path.basename(os.path.normpath(ocr.checkpoint)), "backend": ocr.backend,
        "renderer_rejects": rejects, "rows": rows, "target_bleu_gap": TARGET_BLEU_GAP,
        "within_target": all(r["bleu_gap"] <= TARGET_BLEU_GAP for r in rows),
        "draw_s": round(draw_s, 1), "total_s": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
