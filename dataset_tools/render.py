"""Render normalized LaTeX formulas to PNG images with batched `latex` + `dvipng`.

    python -m dataset_tools.render FORMULAS.txt -o OUT_DIR [--dpi LO HI] [--dpi-step 5]
        [--fonts cm,mathptmx,...] [--workers N] [--seed S] [--patch-size 16] [--rejects FILE]
        [--scale-dpi 55 460 --scale-share 0.4]

Line i of FORMULAS.txt (0-based) becomes OUT_DIR/{i:07d}.png: grayscale ("L"), dark ink on white,
cropped to the ink with `margin` px around it and padded with white (ink centred) so that width and
height are multiples of `patch_size`. With `--scale-dpi LO HI --scale-share P` (scale
augmentation) a share P of the formulas is drawn at a dpi from LO..HI (e.g. 0.5x-4x the training
resolution) and every image is brought to the training glyph scale by prediction's own step
(`pix2tex.preprocess.normalize_scale`), so the model trains on what a screenshot becomes.
A formula that does not render is never dropped silently: it lands in `RenderResult.rejected`
and in the rejects file (CLI default OUT_DIR + ".rejects.txt", a sibling of the image folder) as
`index<TAB>reason<TAB>formula`, sorted by index. The rejects file is rewritten by each run and
lists every formula of the input without an image.

How it works. Each formula gets a font package and a dpi (lo, lo + dpi_step, ... <= hi) drawn
from `Random(f"{seed}:{index}")`, so a resumed run draws the same. Formulas are grouped by font,
sorted by dpi and cut into batches; one batch is one `latex -interaction=nonstopmode` run: the
preamble, then per formula the line
`\\pixtexpage{INDEX}\\begin{preview}$\\displaystyle FORMULA $\\end{preview}\\pixtexcheck` and a
blank line (it ends a runaway argument inside the formula's own block). preview.sty ships one DVI
page per formula whose \\count0 names the formula, and \\pixtexcheck logs TeX's state after it.
Errors are mapped to formulas by the log's line numbers. A formula with an error in its block is
rejected with TeX's message; if the error left TeX's state changed (an unclosed environment, a
fatal stop), the rest of the batch is run again; a formula without an error and without a clean
page (a runaway argument) is run alone, and so is the rest. Formulas after an error that left the
state clean keep their pages: one latex run per batch in the common case. A timed-out run is
bisected. `dvipng -T tight` draws the pages, one call per dpi. (No `tightpage` option: it would
clip ink outside the formula's box, e.g. from \\rlap or \\smash; `-T tight` crops to the ink.)
A formula that fails in another font's package only (\\jmath in mathptmx, a glyph missing in
mathpazo) is drawn in Computer Modern instead when "cm" is among the fonts. (Against
-halt-on-error with a re-run of the rest after each error, this takes 1.3x less CPU time on
im2latex formulas, 0.2% failures, and 5.6x less on arXiv ones, 4-5% failures.)

Safety for untrusted formulas: latex runs in a fresh private directory with -no-shell-escape
(\\write18 is logged as "disabled", never run), openin_any=p / openout_any=p (no reading or
writing of absolute paths, dotfiles or parent folders: \\input{/etc/passwd} is a "file not found"
reject), no font generation (MKTEX*=0), and a time limit per run whose whole process group is
killed (\\def\\x{\\x}\\x becomes a "timeout" reject). Formulas that can change global TeX state
(\\def, \\global, \\csname, \\if..., \\input, \\write, ...) are typeset alone so they cannot affect
their neighbours. A page that carries any \\special is rejected before dvipng sees it (dvipng
would embed a PNG/JPEG named by `PSfile=` from anywhere on disk), and dvipng runs with --nogs
(no GhostScript), --picky and a memory limit.

This module must not import torch.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import random
import resource
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pix2tex.preprocess import normalize_scale  # numpy and Pillow only, like this module

# Math font packages, in the order `available_fonts()` lists them ("cm": no package, Computer
# Modern). All ship with the Debian packages texlive-latex-base/-recommended/-fonts-recommended.
FONTS: dict[str, str] = {
    "cm": "",
    "mathptmx": r"\usepackage{mathptmx}",
    "mathpazo": r"\usepackage{mathpazo}",
    "txfonts": r"\usepackage{txfonts}",
    "pxfonts": r"\usepackage{pxfonts}",
    "euler": r"\usepackage{euler}",
}
# Every run's preamble has the same number of lines (the font line may be empty), so the first
# formula is always on line FIRST_LINE. \pixtexpage{N} makes the next preview page's \count0 N
# (preview.sty numbers pages by its snippet counter), so every page names its formula.
# \pixtexcheck logs the input line and TeX's state (group and conditional depth, environment,
# mode) after each formula: a formula whose check ran on another line, or whose error left
# another state than the one at \begin{document}, makes the formulas after it suspect.
# \bm (bm.sty's bold math) and \mathscr (mathrsfs) are on the font line: arXiv formulas use
# both often (they were ~40% of its TeX rejects). \bm is amsmath's \boldsymbol rather than
# bm.sty, whose \boldsymbol takes tens of seconds on nested arguments (\boldsymbol {
# \boldsymbol { M } }, seen in arXiv formulas) and would time out whole batches.
PREAMBLE = ("\\documentclass{{article}}\n\\usepackage{{amsmath,amssymb,amsfonts}}\n"
            "{font}\\usepackage{{mathrsfs}}\\providecommand{{\\bm}}[1]{{\\boldsymbol{{#1}}}}\n"
            "\\usepackage[active]{{preview}}\\makeatletter"
            "\\def\\pixtexpage#1{{\\global\\pr@snippet=#1\\relax\\gdef\\pixtex@id{{#1}}}}"
            "\\def\\pixtexcheck{{\\typeout{{pixtex-state \\pixtex@id:\\the\\inputlineno:"
            "\\the\\currentgrouplevel:\\the\\currentiflevel:\\@currenvir:"
            "\\ifmmode m\\else\\ifhmode h\\else v\\fi\\fi}}}}"
            "\\def\\pixtex@id{{start}}\\makeatother\n\\begin{{document}}\\pixtexcheck\n")
FIRST_LINE = 6  # job.tex line of the first formula; formula k is on FIRST_LINE + 2k
DEFAULT_DPI = (110, 180)
# dvipng costs ~20 ms per call (library loading) and draws one dpi per call: drawing the dpi in
# steps keeps the calls per batch few (step 1: 1.6x the CPU time on the 8k im2latex formulas).
DEFAULT_DPI_STEP = 5
DEFAULT_BATCH = 400  # formulas per latex run (latex start-up ~0.1 s CPU, then ~0.5 ms a formula)
MIN_BATCH = 25  # smaller inputs are cut into batches of this size to use all workers
DEFAULT_TIMEOUT = 30.0  # seconds per latex/dvipng run; a batch of 400 takes ~0.4 s on one core
MAX_PIXELS = 40_000_000  # larger pages are rejected before decoding (hostile \rule{5m}{5m})
DVIPNG_MEMORY = 1 << 30  # bytes of address space dvipng may use (a MAX_PIXELS page needs ~200 MB)
# latex's own arrays bound what a formula can allocate ("TeX capacity exceeded"); the address-space
# limit is the guard for a latex built or configured with larger ones (texmf.cnf main_memory).
LATEX_MEMORY = 1 << 30
TEX_PACKAGES = ("texlive-latex-base texlive-latex-recommended texlive-fonts-recommended dvipng "
                "preview-latex-style")

# --- the two label-preserving repairs ----------------------------------------------------------

_UNIT = r"(?:pt|pc|in|bp|cm|mm|dd|cc|sp|em|ex|mu|px|fil{1,3})"
_DIM = rf"=?[-+]*(?:[0-9.,]+(?:true)?{_UNIT}?|[0-9.,]*(?:true)?{_UNIT})"
_GLUE_RE = re.compile(rf"{_DIM}(?:plus{_DIM})?(?:minus{_DIM})?")
# Commands whose arguments hold dimensions, numbers or positions: the arguments to join, in
# order ("{" required, "[" and "(" optional). "run": an unbraced TeX dimension or glue follows.
_DIM_ARGS: dict[str, tuple[str, ...] | str] = {
    **{c: ("{",) for c in (r"\hspace", r"\vspace", r"\hspace*", r"\vspace*", r"\linethickness",
                           r"\circle", r"\circle*")},
    r"\rule": ("[", "{", "{"), r"\raisebox": ("{", "[", "["), r"\parbox": ("[", "[", "[", "{"),
    r"\makebox": ("(", "[", "["), r"\framebox": ("(", "[", "["), r"\setlength": ("{", "{"),
    r"\addtolength": ("{", "{"), r"\fontsize": ("{", "{"), r"\\": ("[",), r"\\*": ("[",),
    r"\put": ("(",), r"\multiput": ("(", "("), r"\line": ("(", "{"), r"\vector": ("(", "{"),
    r"\oval": ("(", "["), r"\dashbox": ("{", "(", "["),
    **{c: "run" for c in (r"\kern", r"\mkern", r"\hskip", r"\vskip", r"\mskip", r"\raise",
                          r"\lower", r"\moveleft", r"\moveright", r"\unitlength", r"\jot",
                          r"\arraycolsep", r"\tabcolsep", r"\mathsurround")},
}
_CLOSE = {"{": "}", "[": "]", "(": ")"}


def _is_char(tok: str) -> bool:
    return len(tok) == 1 and tok not in "{}[]()\\%$#&~^_"


def _group_end(toks: list[str], i: int) -> int:
    """Index of the token closing the group opened at toks[i] ("{" nests; "[" and "(" do not), or -1."""
    opener, closer, depth = toks[i], _CLOSE[toks[i]], 0
    for j in range(i, len(toks)):
        if toks[j] == opener and opener == "{":
            depth += 1
        elif toks[j] == closer:
            depth -= 1
            if depth <= 0:
                return j
    return -1


def prepare_for_tex(formula: str) -> str:
    """The two repairs a normalized formula needs before TeX, both keeping its label: re-join
    split dimensions (`\\hspace { 2 c m }` -> `\\hspace {2cm}`, `\\kern - 0 . 1 e m` -> `\\kern -0.1em`,
    `\\\\ [ 2 p t ]`, picture coordinates `\\put ( 1 0 , 2 0 )`) and drop a trailing lone `\\`
    (it would escape the closing `$`). Whitespace is collapsed to single spaces."""
    toks = formula.split()
    while toks and toks[-1] == "\\":
        toks.pop()
    out: list[str] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        out.append(tok)
        i += 1
        spec = _DIM_ARGS.get(tok)
        if spec is None:
            continue
        if spec == "run":  # \kern - 0 . 1 e m: the longest prefix of single characters that is glue
            j = i
            while j < len(toks) and j - i < 40 and _is_char(toks[j]):
                j += 1
            m = _GLUE_RE.match("".join(toks[i:j]))
            if m and m.end() > 0 and any(c.isdigit() for c in m.group()):
                out.append(m.group())
                i += m.end()  # one character per token
            continue
        if i < len(toks) and toks[i] == "*" and tok in (r"\hspace", r"\vspace", r"\circle", "\\\\"):
            out.append("*")
            i += 1
        for kind in spec:
            if i >= len(toks) or toks[i] != kind:
                if kind == "{":
                    break
                continue  # an optional argument that is not there
            j = _group_end(toks, i)
            if j < 0:
                break
            inner = toks[i + 1:j]
            if inner and all(_is_char(t) for t in inner):
                out.append(kind + "".join(inner) + _CLOSE[kind])
            else:
                out.extend(toks[i:j + 1])
            i = j + 1
    return " ".join(out)


# Formulas that could leave TeX state behind for the next formula of a batch (global
# definitions, conditionals, file and output primitives, catcodes, ...) are typeset alone.
_SOLO_CS = re.compile(
    r"\\(?:global|gdef|xdef|edef|def|let|futurelet|long|outer|protected|csname|endcsname|expandafter"
    r"|noexpand|if(?!f(?![a-zA-Z]))[a-zA-Z]*|fi|else|or|unless|input|include|endinput|openin|openout"
    r"|closein|closeout|read|readline|write|immediate|message|special|shipout|output|every[a-z]+"
    r"|aftergroup|afterassignment|catcode|lccode|uccode|sfcode|mathcode|delcode|scantokens|string"
    r"|detokenize|unexpanded|font|fontdimen|hyphenchar|skewchar|globaldefs|count|dimen|skip|muskip"
    r"|toks|advance|multiply|divide|setbox|newcommand|renewcommand|providecommand|newenvironment"
    r"|renewenvironment|(?:Declare|New|Renew|Provide)[a-zA-Z]*|newcounter|setcounter|addtocounter"
    r"|stepcounter|refstepcounter|makeatletter|makeatother|ExplSyntaxOn|UseName|dump|batchmode"
    r"|nonstopmode|scrollmode|errorstopmode|begingroup|endgroup|loop|repeat|verb|pdf[a-zA-Z]*"
    r"|primitive|documentclass|usepackage|RequirePackage|end(?![a-zA-Z])(?!\s*\{))(?![a-zA-Z])"
    r"|\^\^|(?<!\\)(?:\\\\)*%|(?<!\\)(?:\\\\)*\$"
    r"|\\(?:begin|end)\s*\{\s*(?:document|preview)\s*\}")


def needs_solo(tex: str) -> bool:
    """True if `tex` (prepared) must be typeset in a latex run of its own."""
    return _SOLO_CS.search(tex) is not None


# --- fonts and per-formula style ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def available_fonts() -> list[str]:
    """The names of FONTS whose package is installed (kpsewhich), "cm" first."""
    if shutil.which("kpsewhich") is None:
        raise RuntimeError(f"kpsewhich not found: install TeX (apt-get install {TEX_PACKAGES})")
    names = [n for n in FONTS if n != "cm"]
    proc = subprocess.run(["kpsewhich", *(f"{n}.sty" for n in names)], capture_output=True,
                          text=True, timeout=60)
    found = {os.path.basename(p)[:-4] for p in proc.stdout.split()}
    return ["cm"] + [n for n in names if n in found]


def choose_style(index: int, seed: int, dpi: tuple[int, int], fonts: list[str],
                 dpi_step: int = DEFAULT_DPI_STEP, scale_dpi: tuple[int, int] | None = None,
                 scale_share: float = 0.0) -> tuple[str, int]:
    """The (font, dpi) of formula `index`: a pure function of its arguments, so resumed and
    repeated runs draw the same. dpi is one of lo, lo + dpi_step, ... <= hi; with `scale_dpi`, a
    share `scale_share` of the formulas is drawn from that range instead, log-uniformly (as many
    between 2x and 4x the training scale as between 1x and 2x), rounded to dpi_step."""
    rng = random.Random(f"{seed}:{index}")
    font = fonts[rng.randrange(len(fonts))]
    d = dpi[0] + dpi_step * rng.randint(0, (dpi[1] - dpi[0]) // dpi_step)
    if scale_dpi is not None and scale_share > 0:
        # a generator of its own: the draws above stay what they were without scale_dpi
        far = random.Random(f"{seed}:{index}:scale")
        if far.random() < scale_share:
            lo, hi = scale_dpi
            d = math.exp(far.uniform(math.log(lo), math.log(hi)))
            d = min(hi, max(lo, lo + dpi_step * round((d - lo) / dpi_step)))
    return font, int(d)


# --- results -----------------------------------------------------------------------------------

@dataclass
class RenderResult:
    rendered: dict[int, str] = field(default_factory=dict)  # index -> png path (new and existing)
    rejected: dict[int, str] = field(default_factory=dict)  # index -> reason
    skipped: int = 0  # images that were already there
    seconds: float = 0.0
    # summed over workers, see TIMING_KEYS: wall (_s) and CPU (_cpu) seconds of latex, dvipng and
    # the crop/pad/save in Python ("post"); how many batches and latex and dvipng runs there were
    # (latex_runs - batches: runs after an error or timeout). CPU figures of latex and dvipng are
    # those of the child processes (wait4), "post" the rendering threads' own CPU time.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def attempted(self) -> int:
        return len(self.rendered) - self.skipped + len(self.rejected)

    @property
    def formulas_per_s(self) -> float:
        return self.attempted / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_rate(self) -> float:
        return len(self.rejected) / self.attempted if self.attempted else 0.0


TIMING_KEYS = ("batches", "latex_s", "latex_cpu", "latex_runs", "dvipng_s", "dvipng_cpu", "dvipng_runs",
               "post_s", "post_cpu")


@dataclass
class _Job:
    index: int
    tex: str
    dpi: int


def _png_name(index: int) -> str:
    return f"{index:07d}.png"


# --- running TeX ---------------------------------------------------------------------------------

# kpathsea variables without the TEX prefix that also redirect what TeX reads
TEXMF_VARIABLES = {"BIBINPUTS", "BSTINPUTS", "ENCFONTS", "OPENTYPEFONTS", "PKFONTS", "T1FONTS",
                   "TFMFONTS", "TTFONTS", "VFFONTS", "MFINPUTS", "MPINPUTS", "SYSTEXMF",
                   "VARTEXFONTS", "DVIPSHEADERS"}

def _tex_env() -> dict[str, str]:
    """The environment TeX runs in: the caller's without any TeX search path or kpathsea setting
    (TEXINPUTS, TEXMFHOME, TEXMFOUTPUT, ..., KPSE_*: a folder of look-alike .sty files in one
    would change what every formula renders as, or read files paranoid mode keeps out), plus
    paranoid file access, no shell escape, no font generation."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("TEX", "KPSE", "MKTEX")) and k not in TEXMF_VARIABLES}
    env.update(openin_any="p", openout_any="p", shell_escape="f",
               max_print_line="10000", error_line="254", half_error_line="238",
               MKTEXTFM="0", MKTEXPK="0", MKTEXMF="0", MKTEXFMT="0")
    return env


def _run(cmd: list[str], cwd: str, timeout: float, t: dict, stage: str,
         memory_bytes: int | None = None, stderr_file: str | None = None) -> int | None:
    """Run cmd in its own process group; kill the whole group on timeout. Returns the exit
    status, None on timeout. Adds its wall and CPU seconds to t[stage + "_s"/"_cpu"]. The process
    runs under an address-space limit (`memory_bytes`) and a CPU-time limit a second over
    `timeout`: the kernel stops it even if the timer thread here cannot."""
    t0 = time.perf_counter()
    with open(stderr_file or os.devnull, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_tex_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    if hasattr(resource, "prlimit"):
        cpu = math.ceil(timeout) + 1
        try:  # set right after exec, long before the process allocates its pages
            resource.prlimit(proc.pid, resource.RLIMIT_CPU, (cpu, cpu))
            if memory_bytes:
                resource.prlimit(proc.pid, resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:  # wait4, not Popen.wait: the child's own CPU time, exact with several threads
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    t[stage + "_s"] += time.perf_counter() - t0
    t[stage + "_cpu"] += usage.ru_utime + usage.ru_stime
    t[stage + "_runs"] += 1
    return None if killed.is_set() else proc.returncode


_ERR_RE = re.compile(r"^(\S+?):(\d+): (.*)$|^! (.*)$", re.M)
_CONTEXT_RE = re.compile(r"^l\.(\d+) (.*)$", re.M)
_STATE_RE = re.compile(r"^pixtex-state (\S+?):(\d+):(.*)$", re.M)


def _tex_errors(log: str) -> list[tuple[str, int | None]]:
    """Every TeX error of a log, in order: (message with the input read so far, line number in
    job.tex or None)."""
    found = list(_ERR_RE.finditer(log))
    errors = []
    for m, nxt in zip(found, found[1:] + [None]):
        msg = (m.group(3) or m.group(4)).strip()
        ours = m.group(1) is None or m.group(1) in ("job.tex", "./job.tex")  # not inside a package
        line = int(m.group(2)) if m.group(2) and ours else None
        ctx = _CONTEXT_RE.search(log, m.end(), nxt.start() if nxt else len(log))
        if ctx is not None and ours:
            line = line or int(ctx.group(1))
            read = ctx.group(2).strip().split(r"\displaystyle", 1)[-1].strip()  # the formula part
            if read:
                msg += f" [at: {read[-80:]}]"
        errors.append((msg, line))
    return errors


# parameter bytes of the DVI opcodes >= 128 that have a fixed length
_DVI_LEN = [0] * 256
for _op in range(128, 132):
    _DVI_LEN[_op] = _op - 127  # set1-4
for _op in range(133, 137):
    _DVI_LEN[_op] = _op - 132  # put1-4
_DVI_LEN[132] = _DVI_LEN[137] = 8  # set_rule, put_rule
for _base in (143, 148, 153, 157, 162, 167):  # right, w, x, down, y, z (1-4 byte forms)
    for _k in range(4):
        _DVI_LEN[_base + _k] = _k + 1
for _op in range(235, 239):
    _DVI_LEN[_op] = _op - 234  # fnt1-4


@dataclass
class _Page:
    count0: int
    specials: list[bytes] = field(default_factory=list)
    # where ink lands (sp): glyph origins and rule boxes; glyph sizes are unknown here
    box: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # h_min, h_max, v_min, v_max

    def pixels(self, dpi: int) -> tuple[float, float]:
        scale = dpi / 72.27 / 65536
        return (self.box[1] - self.box[0]) * scale, (self.box[3] - self.box[2]) * scale


def _dvi_pages(path: str) -> list[_Page]:
    """The pages of a DVI file, in order: \\count0, specials and the extent of the ink."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:  # TeX writes no DVI when there are no pages
        return []
    if len(data) < 15 or data[0] != 247:
        raise ValueError(f"{path}: not a DVI file")

    def num(at: int, k: int, signed: bool = True) -> int:
        return int.from_bytes(data[at:at + k], "big", signed=signed)

    pages: list[_Page] = []
    page = _Page(0)
    h = v = w = x = y = z = 0
    stack: list[tuple[int, ...]] = []
    box = page.box
    p, n = 15 + data[14], len(data)
    while p < n:
        op = data[p]
        if op < 128 or 133 <= op <= 136 or 128 <= op <= 131:  # glyph
            if h < box[0]: box[0] = h  # noqa: E701 (the hot loop)
            if h > box[1]: box[1] = h  # noqa: E701
            if v < box[2]: box[2] = v  # noqa: E701
            if v > box[3]: box[3] = v  # noqa: E701
            p += 1 if op < 128 else 1 + (op - 127 if op < 132 else op - 132)
        elif 171 <= op <= 234:  # fnt_num
            p += 1
        elif op == 132 or op == 137:  # set_rule, put_rule: height a, width b
            a, b = num(p + 1, 4), num(p + 5, 4)
            if a > 0 and b > 0:
                box[0], box[1] = min(box[0], h, h + b), max(box[1], h, h + b)
                box[2], box[3] = min(box[2], v - a), max(box[3], v)
            if op == 132:
                h += b
            p += 9
        elif op == 141:
            stack.append((h, v, w, x, y, z))
            p += 1
        elif op == 142:
            h, v, w, x, y, z = stack.pop() if stack else (h, v, w, x, y, z)
            p += 1
        elif 143 <= op <= 170:  # right, w, x, down, y, z
            if op <= 146:
                h += num(p + 1, op - 142)
            elif op <= 151:
                if op > 147:
                    w = num(p + 1, op - 147)
                h += w
            elif op <= 156:
                if op > 152:
                    x = num(p + 1, op - 152)
                h += x
            elif op <= 160:
                v += num(p + 1, op - 156)
            elif op <= 165:
                if op > 161:
                    y = num(p + 1, op - 161)
                v += y
            else:
                if op > 166:
                    z = num(p + 1, op - 166)
                v += z
            p += 1 + _DVI_LEN[op]
        elif op == 139:  # bop: c0..c9, pointer
            page = _Page(num(p + 1, 4))
            pages.append(page)
            box = page.box
            h = v = w = x = y = z = 0
            stack = []
            p += 45
        elif 239 <= op <= 242:  # xxx: a \special
            k = op - 238
            size = num(p + 1, k, signed=False)
            page.specials.append(data[p + 1 + k:p + 1 + k + size])
            p += 1 + k + size
        elif 243 <= op <= 246:  # fnt_def
            k = op - 242
            p += 1 + k + 14 + data[p + k + 13] + data[p + k + 14]
        elif op == 248:  # post
            break
        else:  # nop, eop, fnt1-4
            p += 1 + _DVI_LEN[op]
    return pages


# specials the preamble itself puts on a page (expl3's dvips backend header)
_OWN_SPECIALS = {b"header=l3backend-dvips.pro"}


# --- one batch: latex, dvipng, crop/pad ----------------------------------------------------------

def _postprocess(src: str, dst: str, patch_size: int, margin: int,
                 scale: bool = False) -> str | None:
    """dvipng page -> final PNG (atomic). Returns a reject reason or None. scale: bring the
    cropped ink to the training glyph scale as prediction does (pix2tex.preprocess.normalize_scale)
    before the padding."""
    with open(src, "rb") as f:  # the PNG header's size, before anything is decoded
        head = f.read(24)
    w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if w * h > MAX_PIXELS:
        return f"image too large: {w}x{h} px"
    try:
        with Image.open(src) as im:
            a = np.asarray(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for a broken PNG
        return f"dvipng wrote an unreadable PNG: {e}"
    rows = np.flatnonzero((a < 255).any(axis=1))
    if rows.size == 0:
        return "empty image (no ink)"
    cols = np.flatnonzero((a < 255).any(axis=0))
    a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if scale:
        a = normalize_scale(a)
    h, w = a.shape
    H = -(-(h + 2 * margin) // patch_size) * patch_size
    W = -(-(w + 2 * margin) // patch_size) * patch_size
    out = np.full((H, W), 255, dtype=np.uint8)
    y, x = (H - h) // 2, (W - w) // 2
    out[y:y + h, x:x + w] = a
    tmp = f"{os.path.dirname(dst)}/.{os.path.basename(dst)}.{os.getpid()}.tmp"
    Image.fromarray(out, mode="L").save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, dst)
    return None


def _dvipng(jobs: list[_Job], workdir: str, timeout: float, t: dict) -> dict[int, str]:
    """Draw the pages of `jobs` (all in job.dvi, \\count0 = index) with one dvipng call per dpi.
    Returns index -> png path, or -> "!reason" for a page that did not come out. A call that
    fails is retried page by page, so that one bad page cannot cost its neighbours."""
    by_dpi: dict[int, list[_Job]] = {}
    for j in jobs:
        by_dpi.setdefault(j.dpi, []).append(j)
    made: dict[int, str] = {}
    err_file = os.path.join(workdir, "dvipng.err")
    for dpi, group in by_dpi.items():
        for part in [group] + ([[j] for j in group] if len(group) > 1 else []):
            if all(j.index in made for j in part):
                continue
            # --picky: no image for a page with a warning (e.g. a glyph missing from the font)
            cmd = ["dvipng", "-T", "tight", "-D", str(dpi), "-z", "1", "--nogs", "--picky",
                   "--dvinum", "-o", "p%d.png", "-pp", ",".join(str(j.index) for j in part), "job.dvi"]
            # the memory limit: a hostile page (\rule{5m}{5m}) must not take the machine's memory
            rc = _run(cmd, workdir, timeout, t, "dvipng", memory_bytes=DVIPNG_MEMORY, stderr_file=err_file)
            for j in part:
                png = os.path.join(workdir, f"p{j.index}.png")
                if rc is not None and os.path.exists(png):  # a killed call may leave half a file
                    made[j.index] = png
                elif len(part) == 1:
                    with open(err_file, encoding="utf-8", errors="replace") as f:
                        lines = [x.strip() for x in f.read().split("dvipng")
                                 if "warning" in x or "error" in x]
                    made[j.index] = "!dvipng " + (lines[-1] if lines else "timed out" if rc is None
                                                  else f"drew no image (exit {rc})")
            if all(j.index in made for j in group):
                break
    return made


def _render_batch(font: str, jobs: list[_Job], out_dir: str, patch_size: int, margin: int,
                  timeout: float, scale: bool) -> tuple[list[tuple[int, str | None, str | None]], dict]:
    """Typeset and draw one batch (one font). Returns ([(index, png, reason)], timings)."""
    t = dict.fromkeys(TIMING_KEYS, 0.0)
    t["batches"] = 1
    results: list[tuple[int, str | None, str | None]] = []
    todo = [jobs]  # a stack of job lists, each one latex run
    while todo:
        part = todo.pop()
        with tempfile.TemporaryDirectory(prefix="pix2tex-render-") as work:
            good, todo_next = _typeset(font, part, work, timeout, t, results)
            todo += todo_next
            made = _dvipng(good, work, timeout, t)
            t0, c0 = time.perf_counter(), time.thread_time()
            for j in good:
                if made[j.index].startswith("!"):
                    results.append((j.index, None, made[j.index][1:]))
                    continue
                dst = os.path.join(out_dir, _png_name(j.index))
                why = _postprocess(made[j.index], dst, patch_size, margin, scale)
                results.append((j.index, None, why) if why else (j.index, dst, None))
            t["post_s"] += time.perf_counter() - t0
            t["post_cpu"] += time.thread_time() - c0
    return results, t


def _typeset(font: str, part: list[_Job], work: str, timeout: float, t: dict,
             results: list) -> tuple[list[_Job], list[list[_Job]]]:
    """One latex run over `part` in `work`. Appends rejects to `results`; returns the jobs whose
    page is good (drawn next from work/job.dvi) and the job lists that need another run."""
    body = "".join(f"\\pixtexpage{{{j.index}}}\\begin{{preview}}$\\displaystyle {j.tex} "
                   f"$\\end{{preview}}\\pixtexcheck\n\n" for j in part)
    with open(os.path.join(work, "job.tex"), "w", encoding="utf-8") as f:
        f.write(PREAMBLE.format(font=FONTS[font]) + body + "\\end{document}\n")
    rc = _run(["latex", "-interaction=nonstopmode", "-file-line-error", "-no-shell-escape", "job.tex"],
              work, timeout, t, "latex", memory_bytes=LATEX_MEMORY)
    if rc is None:  # timeout: bisect down to the formula that loops
        if len(part) == 1:
            results.append((part[0].index, None, "timeout"))
            return [], []
        return [], [part[len(part) // 2:], part[:len(part) // 2]]
    with open(os.path.join(work, "job.log"), encoding="utf-8", errors="replace") as f:
        log = f.read()
    errors = _tex_errors(log)
    for msg, line in errors:
        if line is not None and line < FIRST_LINE:
            raise RuntimeError(f"latex fails in the preamble of font {font!r}: {msg}; check that its "
                               f"package is installed (kpsewhich {font}.sty)")
    # id -> (input line, state) when the check after that formula ran
    states = {i: (int(line), state) for i, line, state in _STATE_RE.findall(log)}
    pages: dict[int, list[_Page]] = {}
    for page in _dvi_pages(os.path.join(work, "job.dvi")):
        pages.setdefault(page.count0, []).append(page)

    if len(part) == 1:  # alone: any error is this formula's
        j = part[0]
        if errors or len(pages.get(j.index, ())) != 1 or len(pages) != 1:
            reason = f"tex: {errors[0][0]}" if errors else \
                f"typesets to {sum(map(len, pages.values()))} pages, not one"
            results.append((j.index, None, reason))
            return [], []
        return _check_pages(part, pages, results), []

    # In order: a formula is judged by its own block (its line and the blank line after it) as
    # long as every error before it left TeX's state as it was at \begin{document}.
    block_error: dict[int, str] = {}
    for msg, line in errors:
        if line is not None and 0 <= (line - FIRST_LINE) // 2 < len(part):
            block_error.setdefault((line - FIRST_LINE) // 2, msg)
    clean_state = states.get("start", (0, None))[1]
    trusted, again = [], []
    for k, j in enumerate(part):
        # the check must have run on the formula's own line: one that ran later was carried
        # along by a runaway argument, and so was the formula's page
        state_ok = clean_state is not None and \
            states.get(str(j.index)) == (FIRST_LINE + 2 * k, clean_state)
        if k in block_error:
            results.append((j.index, None, f"tex: {block_error[k]}"))
            if not state_ok:  # its error leaks (an unclosed environment, a fatal stop): redo the rest
                again = part[k + 1:]
                break
        elif len(pages.get(j.index, ())) == 1 and state_ok:
            trusted.append(j)
        else:  # no error in its block, yet no clean page: e.g. a runaway argument; try it alone
            rest = [part[k + 1:]] if k + 1 < len(part) else []
            return _check_pages(trusted, pages, results), rest + [[j]]
    return _check_pages(trusted, pages, results), [again] if again else []


def _check_pages(jobs: list[_Job], pages: dict[int, list[_Page]], results: list) -> list[_Job]:
    """The jobs whose page may go to dvipng: no \\special, not absurdly large."""
    good = []
    for j in jobs:
        page = pages[j.index][0]
        w, h = page.pixels(j.dpi)
        if any(s not in _OWN_SPECIALS for s in page.specials):
            results.append((j.index, None, "output contains a \\special (not allowed)"))
        elif w * h > MAX_PIXELS:  # before dvipng spends seconds on it
            results.append((j.index, None, f"image too large: at least {w:.0f}x{h:.0f} px"))
        else:
            good.append(j)
    return good


# --- public API ----------------------------------------------------------------------------------

def _check_tools() -> None:
    missing = [tool for tool in ("latex", "dvipng", "kpsewhich") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found on PATH: install TeX with "
                           f"`apt-get install {TEX_PACKAGES}` (or run `make setup`)")


def render_formulas(formulas: list[str], out_dir: str | os.PathLike, *,
                    dpi: tuple[int, int] | int = DEFAULT_DPI, dpi_step: int = DEFAULT_DPI_STEP,
                    fonts: list[str] | None = None,
                    patch_size: int = 16, margin: int = 2, workers: int | None = None, seed: int = 0,
                    batch_size: int = DEFAULT_BATCH, timeout: float = DEFAULT_TIMEOUT,
                    rejects_path: str | os.PathLike | None = None, progress: bool = True,
                    dpis: list[int] | None = None, font_each: list[str] | None = None,
                    scale_dpi: tuple[int, int] | None = None,
                    scale_share: float = 0.0) -> RenderResult:
    """Render formulas[i] (im2markup-normalized) to out_dir/{i:07d}.png; see the module docstring.

    dpi: (lo, hi) range drawn per formula in steps of dpi_step (or one int); fonts: names from
    FONTS drawn per formula (default: all `available_fonts()`; one dpi and one font, e.g.
    dpi=160, fonts=["cm"], give comparable images); margin: white px around the ink before
    padding to multiples of patch_size; workers: batches rendered at once (default
    os.cpu_count(); threads, each driving its own latex and dvipng processes); batch_size:
    formulas per latex run;
    timeout: seconds per latex/dvipng run; rejects_path: also write the rejects there
    (`index<TAB>reason<TAB>formula`); progress: a tqdm bar on stderr when it is a terminal;
    dpis: each formula's dpi, instead of one drawn from `dpi` (render-and-compare draws candidates
    at an image's own scale); font_each: each formula's font, instead of one drawn from `fonts`,
    and no Computer Modern fallback for a formula that fails in it.
    scale_dpi, scale_share: scale augmentation, the inputs prediction sees: a share of the
    formulas is drawn at a dpi from scale_dpi (log-uniform, e.g. (55, 460): 0.5x-4x of the
    115-dpi training scale, a HiDPI screenshot or a zoomed PDF), and every image, these and the
    others, is brought to the training glyph scale as `pix2tex.preprocess` brings a user's
    image (its estimate, its errors and its resampling included) before it is padded.
    Images already in out_dir are kept and not drawn again. Formulas that do not render are in
    `result.rejected`, never raised; bad arguments or a missing TeX raise ValueError/RuntimeError."""
    t_start = time.perf_counter()
    _check_tools()
    lo, hi = (dpi, dpi) if isinstance(dpi, int) else (int(dpi[0]), int(dpi[1]))
    if not 10 <= lo <= hi:
        raise ValueError(f"dpi range {dpi!r}: need 10 <= lo <= hi")
    if dpis is not None and (len(dpis) != len(formulas) or any(int(d) < 10 for d in dpis)):
        raise ValueError(f"dpis: need one dpi >= 10 per formula ({len(formulas)}), got {len(dpis)}")
    if dpi_step < 1:
        raise ValueError(f"dpi_step {dpi_step}: need >= 1")
    if not 0.0 <= scale_share <= 1.0 or (scale_share > 0 and scale_dpi is None):
        raise ValueError(f"scale_share {scale_share}: need 0 <= share <= 1, and scale_dpi with a share > 0")
    if scale_dpi is not None and not 10 <= int(scale_dpi[0]) <= int(scale_dpi[1]):
        raise ValueError(f"scale_dpi {scale_dpi!r}: need 10 <= lo <= hi")
    if patch_size < 1 or margin < 0:
        raise ValueError(f"patch_size {patch_size} must be >= 1 and margin {margin} >= 0")
    have = available_fonts()
    fonts = list(have if fonts is None else fonts)
    if font_each is not None and len(font_each) != len(formulas):
        raise ValueError(f"font_each: need one font per formula ({len(formulas)}), got {len(font_each)}")
    bad = list(dict.fromkeys(f for f in [*fonts, *(font_each or ())] if f not in have))
    if not fonts or bad:
        raise ValueError(f"fonts {bad or fonts!r} not available; installed here: {have} "
                         f"(known: {list(FONTS)})")
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    result = RenderResult(timings=dict.fromkeys(TIMING_KEYS, 0.0))
    existing = set(os.listdir(out_dir))
    jobs: dict[str, list[_Job]] = {}  # font -> jobs
    for i, formula in enumerate(formulas):
        name = _png_name(i)
        if name in existing:
            result.rendered[i] = os.path.join(out_dir, name)
            result.skipped += 1
            continue
        tex = prepare_for_tex(formula)
        if not tex:
            result.rejected[i] = "empty formula"
            continue
        font, d = choose_style(i, seed, (lo, hi), fonts, dpi_step, scale_dpi, scale_share)
        if dpis is not None:
            d = int(dpis[i])
        if font_each is not None:
            font = font_each[i]
        jobs.setdefault(font, []).append(_Job(i, tex, d))

    n_jobs = sum(len(js) for js in jobs.values())
    bar = None
    if progress and n_jobs > MIN_BATCH:
        from tqdm import tqdm
        bar = tqdm(total=n_jobs, unit="formula", desc="render", disable=None, smoothing=0.05)
    settings = (out_dir, patch_size, margin, timeout, scale_dpi is not None)
    try:
        _render_all(jobs, settings, batch_size, workers, result, bar)
        # A formula that fails only in another font's package (\jmath in mathptmx, upright Greek
        # in mathpazo's \mathrm) is drawn in Computer Modern rather than lost.
        if "cm" in fonts and font_each is None:
            fallback = [j for font, js in jobs.items() if font != "cm" for j in js
                        if result.rejected.get(j.index, "").startswith(("tex:", "dvipng"))]
            if fallback:
                for j in fallback:
                    del result.rejected[j.index]
                _render_all({"cm": fallback}, settings, batch_size, workers, result, None)
    finally:
        if bar is not None:
            bar.close()
    result.rendered = dict(sorted(result.rendered.items()))
    result.rejected = dict(sorted(result.rejected.items()))
    if rejects_path is not None:
        write_rejects(rejects_path, result.rejected, formulas)
    result.seconds = time.perf_counter() - t_start
    return result


def _render_all(jobs: dict[str, list[_Job]], settings: tuple, batch_size: int, workers: int,
                result: RenderResult, bar) -> None:
    """Cut jobs into batches and render them (in worker processes or threads) into `result`."""
    # Batches: one font each, sorted by dpi (dvipng draws one dpi per call), of equal size, at
    # least one per worker when there is enough work; formulas that could leave TeX state behind
    # are typeset alone.
    n_jobs = sum(len(js) for js in jobs.values())
    per_batch = max(1, min(batch_size, max(MIN_BATCH, -(-n_jobs // workers))))
    batches = []
    for font, js in jobs.items():
        solo = [j for j in js if needs_solo(j.tex)]
        plain = sorted((j for j in js if not needs_solo(j.tex)), key=lambda j: (j.dpi, j.index))
        batches += [(font, [j], *settings) for j in solo]
        if plain:
            size = -(-len(plain) // -(-len(plain) // per_batch))
            batches += [(font, plain[b:b + size], *settings) for b in range(0, len(plain), size)]
    batches.sort(key=lambda b: -len(b[1]))  # big ones first: better load balance

    def collect(outcome):
        results, t = outcome
        for key in TIMING_KEYS:
            result.timings[key] += t[key]
        for index, png, reason in results:
            if png is not None:
                result.rendered[index] = png
            else:
                result.rejected[index] = reason
        if bar is not None:
            bar.update(len(results))

    # Threads, not processes: the work runs in the latex and dvipng processes and in Pillow's C
    # code outside the GIL; on 2 cores this was 1.3x faster than a spawn pool (no start-up, no
    # pickling), and it works from any caller (notebooks, stdin scripts, torch's threads).
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(batches)))) as ex:
        for outcome in ex.map(lambda batch: _render_batch(*batch), batches):
            collect(outcome)


def write_rejects(path: str | os.PathLike, rejected: dict[int, str], formulas: list[str]) -> None:
    """`index<TAB>reason<TAB>formula` per rejected formula, sorted by index; written atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in sorted(rejected):
            reason = " ".join(rejected[i].split())  # no tabs or newlines inside a field
            f.write(f"{i}\t{reason}\t{' '.join(formulas[i].split())}\n")
    os.replace(tmp, path)


# --- CLI -----------------------------------------------------------------------------------------

def read_formulas(path: str) -> list[str]:
    """One formula per line; line numbers (0-based) are the indices. Empty lines are kept."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dataset_tools.render",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("formulas", help="text file, one normalized formula per line")
    ap.add_argument("-o", "--out", required=True, help="image folder: OUT/{line:07d}.png")
    ap.add_argument("--dpi", nargs=2, type=int, metavar=("LO", "HI"), default=list(DEFAULT_DPI),
                    help=f"dpi range drawn per formula (default {DEFAULT_DPI[0]} {DEFAULT_DPI[1]})")
    ap.add_argument("--dpi-step", type=int, default=DEFAULT_DPI_STEP,
                    help=f"dpi values are LO, LO+STEP, ... <= HI (default {DEFAULT_DPI_STEP})")
    ap.add_argument("--scale-dpi", nargs=2, type=int, metavar=("LO", "HI"),
                    help="scale augmentation: --scale-share of the formulas at a dpi log-uniform in "
                         "LO..HI (e.g. 55 460: 0.5x-4x the training scale), and every image brought "
                         "to the training glyph scale as prediction's preprocessing does")
    ap.add_argument("--scale-share", type=float, default=0.0,
                    help="share of the formulas drawn from --scale-dpi (default 0)")
    ap.add_argument("--fonts", help=f"comma-separated names (default: those installed of {','.join(FONTS)})")
    ap.add_argument("--workers", type=int, default=None, help="batches at once (default: all cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the font/dpi draws (default 0)")
    ap.add_argument("--patch-size", type=int, default=16, help="pad sides to multiples of this (default 16)")
    ap.add_argument("--margin", type=int, default=2, help="white pixels around the ink (default 2)")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="formulas per latex run")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per latex/dvipng run")
    ap.add_argument("--rejects", help="rejects file (default: OUT + '.rejects.txt', beside the folder)")
    args = ap.parse_args(argv)

    try:
        formulas = read_formulas(args.formulas)
    except OSError as e:
        sys.exit(f"error: cannot read formulas: {e}")
    out = args.out.rstrip("/") or "/"
    rejects = args.rejects or out + ".rejects.txt"
    fonts = [f.strip() for f in args.fonts.split(",") if f.strip()] if args.fonts else None
    try:
        res = render_formulas(formulas, out, dpi=tuple(args.dpi), dpi_step=args.dpi_step,
                              fonts=fonts, patch_size=args.patch_size, margin=args.margin,
                              workers=args.workers, seed=args.seed, batch_size=args.batch_size,
                              timeout=args.timeout, rejects_path=rejects, progress=True,
                              scale_dpi=tuple(args.scale_dpi) if args.scale_dpi else None,
                              scale_share=args.scale_share)
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    new = len(res.rendered) - res.skipped
    print(f"rendered {new}, skipped (already there) {res.skipped}, rejected {len(res.rejected)} "
          f"({100 * res.failure_rate:.2f}% of attempted) in {res.seconds:.1f}s "
          f"= {res.formulas_per_s:.0f} formulas/s; images in {out}, rejects in {rejects}")


if __name__ == "__main__":
    main()
