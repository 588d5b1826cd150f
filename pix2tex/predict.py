"""Use a trained model: the `LatexOCR` Python API and the `pix2tex` command line.

    from pix2tex import LatexOCR
    model = LatexOCR(checkpoint="checkpoints/pix2tex/best.pth")    # config and tokenizer from it
    model("formula.png")                     # -> "\\frac { a } { b }"  (path, bytes, PIL, numpy)
    model.batch(["a.png", "b.png"])          # -> [..., ...]
    model("formula.png", beam_width=5)       # beam search instead of greedy decoding

    pix2tex formula.png folder/ - < pasted.png         # plain, --format inline|display|json

Images go through `pix2tex.preprocess` (any mode, dark backgrounds, crop, scale, pad). A batch
holds images of any sizes, sorted by size so that similar ones share it: each size is encoded on
its own and the decoder reads the memories padded to one length with the padding masked, so a
formula's result never depends on what else is in the batch (tested: the same ids as one at a
time, in float32).

Two backends. ONNX (`backend="onnx"`: a folder written by `python -m pix2tex.export`, or the
released model's graphs in pix2tex/released/) runs with onnxruntime and never imports torch: it is
what a core install (`pip install pix2tex`) has, greedy decoding in float32. torch (`backend=
"torch"`, a `.pth` checkpoint; `pip install 'pix2tex[train]'`) adds beam search, sampling and
bf16. `backend="auto"` (the default) takes the one the checkpoint is, and with no checkpoint the
released ONNX graphs when decoding greedily (the same ids as the torch backend in float32).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from pix2tex.fileio import file_sha256
from pix2tex.onnx_model import META
from pix2tex.preprocess import DEFAULT_MAX_PIXELS, Geometry, ImageError, normalize, preprocess

# Where the project's shipped models live; used when no checkpoint is given. PIX2TEX_CHECKPOINT
# points elsewhere. The torch weights are in the repository's models/ (research installs); the
# default model as ONNX graphs is package data (pix2tex/released/), so every install can read.
# "small" is the distilled student (pix2tex.distill): torch weights only.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_CHECKPOINT = MODELS_DIR / "pix2tex.pth"
RELEASED_ONNX = Path(__file__).resolve().parent / "released"
SHIPPED_MODELS = {"default": DEFAULT_CHECKPOINT, "small": MODELS_DIR / "pix2tex-small.pth"}
BACKENDS = ("auto", "onnx", "torch")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class Reading(NamedTuple):
    """What the model read from one image."""
    latex: str
    complete: bool  # False: cut at the token limit without the formula's end
    # the answer's sequence log-probability (sum of log p over its tokens, its end included; 0 is
    # certain, lower is less sure); None for a blank image
    confidence: float | None
    verified: bool | None = None  # with verify: its drawing matches the image (None: not checked)


class ModelNotFound(FileNotFoundError):
    """No checkpoint given and no default model shipped; the message says what to pass."""


def default_checkpoint() -> Path:
    return Path(os.environ.get("PIX2TEX_CHECKPOINT") or DEFAULT_CHECKPOINT)


def is_onnx_export(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, META))


def choose_backend(backend: str, checkpoint, onnx_can: bool,
                   model: str = "default") -> tuple[str, str]:
    """(backend, model path) for LatexOCR's arguments. "auto": the kind of the given checkpoint;
    with none and the default model, $PIX2TEX_CHECKPOINT, else the released ONNX graphs when they
    can do what is asked (`onnx_can`: greedy, float32, on the CPU), else the torch weights;
    model="small": the shipped student's torch weights."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if model not in SHIPPED_MODELS:
        raise ValueError(f"model must be one of {', '.join(SHIPPED_MODELS)}, got {model!r}")
    if model != "default":
        if checkpoint is not None:
            raise ValueError(f"give a checkpoint or model={model!r} (--model), not both")
        torch_path = SHIPPED_MODELS[model]  # the student ships as torch weights only
        if backend == "onnx":
            raise ModelNotFound(f"the {model} model ships as torch weights only ({torch_path}); "
                                f"use backend='torch' (--backend torch), or export it with "
                                f"`python -m pix2tex.export` and pass that folder as checkpoint")
        if not torch_path.exists():
            raise ModelNotFound(f"no {model} model at {torch_path}: it is made by distillation "
                                f"(README \"Distillation\"); pass checkpoint=... (--checkpoint "
                                f"PATH) with a trained student")
        return "torch", os.fspath(torch_path)
    if checkpoint is None and os.environ.get("PIX2TEX_CHECKPOINT"):
        checkpoint = os.environ["PIX2TEX_CHECKPOINT"]
        if not os.path.exists(checkpoint):
            raise ModelNotFound(f"no checkpoint given and PIX2TEX_CHECKPOINT={checkpoint} does not "
                                f"exist; pass checkpoint=... (--checkpoint PATH) with a trained model")
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if backend == "auto":
            backend = "onnx" if is_onnx_export(checkpoint) else "torch"
        return backend, checkpoint
    if backend == "auto":
        backend = "onnx" if onnx_can and is_onnx_export(RELEASED_ONNX) else "torch"
    default = RELEASED_ONNX if backend == "onnx" else DEFAULT_CHECKPOINT
    if not os.path.exists(default) or (backend == "onnx" and not is_onnx_export(default)):
        raise ModelNotFound(f"no checkpoint given and no default {backend} model at {default}; pass "
                            f"checkpoint=... (--checkpoint PATH) with a trained model or an ONNX export")
    return backend, os.fspath(default)


def resolve_tokenizer(candidates: list, checkpoint: str | os.PathLike | None) -> str:
    """The first existing tokenizer file among the given paths, each tried as written and then
    beside the checkpoint (so a checkpoint folder with its tokenizer.json can be moved)."""
    tried = []
    near = os.path.dirname(os.path.abspath(checkpoint)) if checkpoint else None
    for path in [c for c in candidates if c]:
        path = os.fspath(path)
        options = [path]
        if near:
            options += [os.path.join(near, path), os.path.join(near, os.path.basename(path))]
        for option in options:
            if os.path.isfile(option):
                return option
            tried.append(option)
    if near:
        option = os.path.join(near, "tokenizer.json")
        if os.path.isfile(option):
            return option
        tried.append(option)
    raise FileNotFoundError("tokenizer not found (tried " + ", ".join(dict.fromkeys(tried)) +
                            "); pass tokenizer=... / --tokenizer PATH")


def known_keys(stored: dict) -> dict:
    """A checkpoint's stored config less the keys this version of pix2tex no longer has (training
    settings come and go; a key the model's shape needs shows up as a weights mismatch)."""
    from pix2tex.config import DEFAULTS

    out = {}
    for key, value in stored.items():
        if key not in DEFAULTS:
            continue
        if isinstance(DEFAULTS[key], dict) and isinstance(value, dict) and key != "decoder_args":
            value = {k: v for k, v in value.items() if k in DEFAULTS[key]}
        out[key] = value
    return out


class LatexOCR:
    """Image of a formula -> LaTeX.

    checkpoint: a training checkpoint (`.pth`; its stored config builds the model unless `config`
    is given), or for backend="onnx" the folder written by `python -m pix2tex.export`. None: the
    shipped model named by `model`: "default" (the reader) or "small" (its distilled student,
    models/pix2tex-small.pth; torch backend). tokenizer: overrides the path stored in the
    checkpoint/config.
    Decoding is greedy unless `beam_width` > 1 (or `temperature` > 0 for sampling). verify: decode
    `verify_width` beam candidates (the torch backend; ONNX: the greedy one), draw each with the
    renderer and answer with the best-scoring one whose drawing matches the image
    (`Reading.verified`; pix2tex.verify), else with the best-scoring one, unverified. precision:
    fp32 | bf16 | auto for the torch backend (None: the config's `inference_precision`); the ONNX
    backend runs float32.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                 overrides: list[str] | None = None, tokenizer: str | os.PathLike | None = None,
                 device: str = "auto", backend: str = "auto", beam_width: int = 1,
                 temperature: float = 0.0, max_len: int | None = None, batch_size: int = 16,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 precision: str | None = None, verify: bool = False, verify_width: int = 5,
                 model: str = "default"):
        from pix2tex.config import load_config
        from pix2tex.dataset.tokenizer import load_tokenizer

        onnx_can = (beam_width <= 1 and not temperature and device in ("auto", "cpu")
                    and precision in (None, "fp32") and not verify)
        backend, self.checkpoint = choose_backend(backend, checkpoint, onnx_can, model)
        self.backend = backend
        self.beam_width, self.temperature, self.max_len = beam_width, temperature, max_len
        self.batch_size, self.max_pixels, self.precision = batch_size, max_pixels, precision
        self.verify, self.verify_width = verify, verify_width
        if backend == "torch":
            from pix2tex.extras import require

            require("train", "the torch backend (a .pth checkpoint, beam search, sampling)")
            from pix2tex.checkpoint import load_checkpoint, load_model_weights
            from pix2tex.models import get_model, resolve_device
            import torch

            if threads:
                torch.set_num_threads(threads)
            ckpt = load_checkpoint(self.checkpoint)
            saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
            if config is None and saved is None:
                raise ValueError(f"{self.checkpoint} holds no config (a bare weights file); pass "
                                 f"config=... (--config settings/....yaml) with the one it was trained with")
            self.cfg = load_config(config, overrides, base=None if config else known_keys(saved))
            self.device = resolve_device(device)
            self.model = get_model(self.cfg)
            load_model_weights(self.model, ckpt, source=self.checkpoint)
            self.model.to(self.device).eval()
            tok_candidates = [tokenizer, self.cfg.get("tokenizer"), ckpt.get("tokenizer")]
        else:
            from pix2tex.onnx_model import OnnxModel

            self.model = OnnxModel(self.checkpoint, threads=threads)
            self.cfg = load_config(config, overrides, base=None if config else known_keys(self.model.config))
            self.device = "cpu"
            tok_candidates = [tokenizer, os.path.join(self.checkpoint, "tokenizer.json")]
        tok_path = resolve_tokenizer(tok_candidates, self.checkpoint if backend == "torch" else None)
        want = ckpt.get("tokenizer_sha256") if backend == "torch" else self.model.tokenizer_sha256
        if want and file_sha256(tok_path) != want:  # other ids would decode to the wrong symbols
            raise ValueError(f"{tok_path} is another tokenizer than the one {self.checkpoint} was "
                             f"trained with (contents differ); use that one")
        self.tokenizer = load_tokenizer(tok_path)
        self.geometry = Geometry.from_config(self.cfg)
        self.decode_batches = 0  # decoding passes run so far (each: up to batch_size images)

    # --- the steps, public for the CLI and the service -----------------------------------------

    def preprocess(self, image, max_pixels: int | None = None, keep_crop: bool = False):
        """The page the model sees (uint8 HxW), or None for an image without ink. keep_crop:
        (page, crop), the crop being the image's ink before any resizing, which verification
        compares candidates' drawings with (`read(..., crops=)`)."""
        return preprocess(image, self.geometry, max_pixels=max_pixels or self.max_pixels,
                          keep_crop=keep_crop)

    def prepare(self, image, max_pixels: int | None = None,
                verify: bool | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(page, crop) for `read(pages, crops=)`: the page the model sees, and where verification
        is on (`verify`; None: the constructor's) the image's ink at its own scale that candidates
        are compared with, else None (many large images are not held twice)."""
        page, crop = self.preprocess(image, max_pixels, keep_crop=True)
        return page, crop if (self.verify if verify is None else verify) else None

    def read(self, pages: list[np.ndarray | None], beam_width: int | None = None,
             temperature: float | None = None, max_len: int | None = None,
             should_stop: Callable[[], bool] | None = None,
             verify: bool | None = None, crops: list[np.ndarray | None] | None = None) -> list[Reading]:
        """A `Reading` of each preprocessed page (None: a blank one, read as ""), `batch_size`
        pages per decoding pass, similar sizes together.

        max_len: tokens per formula (None: the `max_len` given at construction, else the model's
        maximum); a formula that reaches it without its end is cut there (`complete` False).
        should_stop: asked once per decoding step; True raises pix2tex.cancel.DecodeCancelled (no
        results). verify: as at construction (None: the constructor's); the candidates of all
        pages are drawn and compared together (the renderer's start-up is paid once). crops: each
        page's image at its own scale (`prepare`), which verification compares with; without
        them the pages, which match only where preprocessing did not resize the image."""
        verify = self.verify if verify is None else verify
        out = [Reading("", True, None)] * len(pages)
        todo = sorted((i for i, page in enumerate(pages) if page is not None),
                      key=lambda i: (pages[i].size, pages[i].shape))  # little padding per batch
        groups = defaultdict(list)
        for i in todo:  # one group, or one per size where the model cannot mix sizes
            groups[True if self.mixes_sizes else pages[i].shape].append(i)
        chunks = [idx[start:start + self.batch_size] for idx in groups.values()
                  for start in range(0, len(idx), self.batch_size)]
        candidates = {}  # page index -> its candidate readings, best first (verify)
        for chunk in chunks:
            chunk_pages = [pages[i] for i in chunk]
            if verify:
                candidates.update(zip(chunk, self._candidates(chunk_pages, max_len, should_stop)))
            else:
                ids, logprob = self._generate(chunk_pages, beam_width, temperature, max_len,
                                              should_stop)
                for i, reading in zip(chunk, self._readings(ids, logprob)):
                    out[i] = reading
        if candidates:
            looks = [pages[i] if crops is None or crops[i] is None else crops[i] for i in candidates]
            for i, reading in zip(candidates, self._verified(looks, list(candidates.values()))):
                out[i] = reading
        return out

    def _readings(self, ids: np.ndarray, logprob: np.ndarray) -> list[Reading]:
        ended = (ids == self.cfg.eos_token).any(axis=1)  # a row without EOS hit max_len
        texts = self.tokenizer.decode_batch(ids.tolist())
        return [Reading(t, bool(e), round(float(lp), 4)) for t, e, lp in zip(texts, ended, logprob)]

    def _candidates(self, pages: list[np.ndarray], max_len, should_stop) -> list[list[Reading]]:
        """Each page's `verify_width` beam candidates, best first (ONNX: the greedy one)."""
        if self.backend == "onnx" or self.verify_width <= 1:  # ONNX: greedy only, one candidate
            ids, logprob = self._generate(pages, 1, 0.0, max_len, should_stop)
            ids, logprob = ids[:, None], logprob[:, None]
        else:
            ids, logprob = self._generate(pages, self.verify_width, 0.0, max_len, should_stop,
                                          beams=True)
        return [[r for r, lp in zip(self._readings(rows, lps), lps) if np.isfinite(lp)]
                for rows, lps in zip(ids, logprob)]

    def _verified(self, looks: list[np.ndarray], candidates: list[list[Reading]]) -> list[Reading]:
        """For each image (`looks`: as verify_pages wants it) the best-scoring candidate whose
        drawing matches it, else the best one, unverified."""
        from pix2tex.verify import verify_pages

        checks = verify_pages(looks, [[r.latex for r in rs] for rs in candidates])
        out = []
        for readings, results in zip(candidates, checks):
            chosen = next((r for r, (ok, _) in zip(readings, results) if ok and r.complete), None)
            out.append(chosen._replace(verified=True) if chosen else
                       readings[0]._replace(verified=False))
        return out

    def recognize(self, pages: list[np.ndarray | None], beam_width: int | None = None,
                  temperature: float | None = None, max_len: int | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  return_complete: bool = False, verify: bool | None = None,
                  crops: list[np.ndarray | None] | None = None) -> list[str] | tuple[list[str], list[bool]]:
        """LaTeX for preprocessed pages, as `read` (with return_complete: (texts, complete))."""
        readings = self.read(pages, beam_width, temperature, max_len, should_stop, verify, crops)
        texts = [r.latex for r in readings]
        return (texts, [r.complete for r in readings]) if return_complete else texts

    @property
    def can_stream(self) -> bool:
        """Whether `stream` serves this reader: the torch backend's greedy decoding with the lean
        decoder step (not beam search, sampling or verify)."""
        return (self.backend == "torch" and getattr(self.model.decoder, "lean", False)
                and self.beam_width <= 1 and not self.temperature and not self.verify)

    def stream(self, max_len: int | None = None) -> "ReadingStream":
        """Continuous batching (the service's): a greedy decode that pages join between steps and
        leave at their end (`ReadingStream`); each page reads as it would alone."""
        if not self.can_stream:
            raise ValueError("continuous batching needs the torch backend's greedy decoding with "
                             "the lean decoder step (no beam search, sampling or verify)")
        return ReadingStream(self, max_len)

    @property
    def mixes_sizes(self) -> bool:
        """Whether one decoding batch may hold several image sizes (an ONNX export from before
        the memory mask cannot)."""
        return self.backend == "torch" or self.model.masks_memory

    def _generate(self, pages: list[np.ndarray], beam_width, temperature, max_len=None,
                  should_stop=None, beams: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, L], sequence log-probabilities [B]) of pages (uint8 [H, W]) of one or several
        sizes; beams (torch, beam_width > 1): every beam, ids [B, k, L] and [B, k]."""
        self.decode_batches += 1
        one_size = len({page.shape for page in pages}) == 1
        images = normalize(np.stack(pages)) if one_size else [normalize(p[None])[0] for p in pages]
        beam_width = self.beam_width if beam_width is None else beam_width
        temperature = self.temperature if temperature is None else temperature
        max_len = self.max_len if max_len is None else max_len
        if self.backend == "onnx":
            if beam_width > 1 or temperature > 0:
                raise ValueError("the ONNX backend decodes greedily only; use backend='torch' for "
                                 "beam search or sampling")
            generate = self.model.generate if one_size else self.model.generate_sizes
            return generate(images, max_len=max_len, should_stop=should_stop, return_logprob=True)
        import torch

        with torch.inference_mode():
            memory = mask = None
            if one_size:
                images = torch.from_numpy(images).to(self.device)
            else:
                memory, mask = self.model.encode_sizes(
                    [torch.from_numpy(x).to(self.device) for x in images], self.precision)
                images = None
            ids, logprob = self.model.generate(
                images, max_len=max_len, temperature=temperature, beam_width=beam_width,
                precision=self.precision, should_stop=should_stop, memory=memory,
                memory_mask=mask, return_logprob=True, return_beams=beams and beam_width > 1)
        return ids.cpu().numpy(), logprob.cpu().numpy()

    # --- the API -----------------------------------------------------------------------------

    def __call__(self, image, beam_width: int | None = None, temperature: float | None = None,
                 verify: bool | None = None) -> str:
        """LaTeX of one image: a path, bytes, file object, PIL image or numpy array. A blank
        image gives ""; an unreadable one raises `pix2tex.preprocess.ImageError`."""
        page, crop = self.prepare(image, verify=verify)
        return self.recognize([page], beam_width, temperature, verify=verify, crops=[crop])[0]

    def batch(self, images, beam_width: int | None = None, temperature: float | None = None,
              verify: bool | None = None) -> list[str]:
        """LaTeX of many images, in order. An unreadable image raises ImageError naming its index."""
        pages, crops = [], []
        for i, image in enumerate(images):
            try:
                page, crop = self.prepare(image, verify=verify)
            except ImageError as e:
                raise type(e)(f"image {i}: {e}") from None
            pages.append(page)
            crops.append(crop)
        return self.recognize(pages, beam_width, temperature, verify=verify, crops=crops)


class ReadingStream:
    """Continuous batching over a `LatexOCR` (torch backend, greedy): `add(pages, keys)` encodes
    pages (any sizes) and lets them join the running decode; each `step()` decodes one token of
    every page in it and returns the pages that ended, as (key, Reading). A page never waits for
    a longer batch-mate, and one that arrives mid-decode starts at the next step. `drop(keys)`:
    pages nobody waits for any more. `steps` and `row_steps` count the decoding steps and the
    pages they decoded (row_steps / steps: pages per step)."""

    def __init__(self, ocr: LatexOCR, max_len: int | None = None):
        import torch

        from pix2tex.models.generate import GreedyStream
        from pix2tex.models.model import encoder_dtype, resolve_precision

        self.ocr, self.torch, model = ocr, torch, ocr.model
        self.precision = resolve_precision(ocr.precision or model.inference_precision,
                                           torch.device(ocr.device))
        max_len = max_len or ocr.max_len
        max_len = min(max_len or model.max_seq_len - 1, model.max_seq_len)
        state = model.decoder.stream(max_len, self.precision, encoder_dtype(self.precision))
        self.decode = GreedyStream(state, model.bos, model.eos, model.pad, max_len)
        self.steps = self.row_steps = 0

    def __len__(self) -> int:
        return len(self.decode)

    def add(self, pages: list[np.ndarray], keys: list) -> None:
        torch = self.torch
        with torch.inference_mode():
            images = [torch.from_numpy(normalize(p[None])[0]).to(self.ocr.device) for p in pages]
            memory, mask = self.ocr.model.encode_sizes(images, self.precision)
            self.decode.add(memory, mask, keys)

    def step(self) -> list[tuple[object, Reading]]:
        rows = len(self.decode)
        with self.torch.inference_mode():
            finished = self.decode.step()
        self.steps, self.row_steps = self.steps + 1, self.row_steps + rows
        texts = self.ocr.tokenizer.decode_batch([ids for _, ids, _, _ in finished])
        return [(key, Reading(text, complete, round(logprob, 4)))
                for (key, _, logprob, complete), text in zip(finished, texts)]

    def drop(self, keys) -> None:
        self.decode.drop(keys)


# --- command line ------------------------------------------------------------------------------

def quiet_third_party_warnings() -> None:
    """Command lines: x-transformers calls the deprecated torch.jit.script at import; a user of
    the command cannot act on that warning."""
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)


def expand_inputs(args: list[str]) -> list[str]:
    """Files as given, folders as their image files (sorted), '-' for stdin."""
    out = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(str(p) for p in Path(arg).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(found)
        else:
            out.append(arg)
    return out


def format_result(fmt: str, name: str, reading: Reading, seconds: float, show_name: bool) -> str:
    latex = reading.latex
    if fmt == "json":
        row = {"file": name, "latex": latex, "confidence": reading.confidence,
               "complete": reading.complete, "seconds": round(seconds, 4)}
        if reading.verified is not None:
            row["verified"] = reading.verified
        return json.dumps(row)
    text = {"plain": latex, "inline": f"${latex}$", "display": f"$${latex}$$"}[fmt]
    return f"{name}: {text}" if show_name else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pix2tex", description="Image of a formula -> LaTeX.")
    p.add_argument("images", nargs="+", help="image files, folders of images, or - for image bytes on stdin")
    p.add_argument("--checkpoint", "-c", help=f"trained checkpoint (.pth) or ONNX export folder "
                                              f"(default: $PIX2TEX_CHECKPOINT, else the released "
                                              f"model: {RELEASED_ONNX} or {DEFAULT_CHECKPOINT})")
    p.add_argument("--model", choices=list(SHIPPED_MODELS), default="default",
                   help="the shipped model to use without --checkpoint: default (the reader) or "
                        "small (its distilled student, faster)")
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the checkpoint names)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): the checkpoint's kind; without one, the released ONNX "
                        "graphs (no torch) unless --beam > 1 asks for the torch weights")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--verify", action="store_true",
                   help="draw 5 beam candidates with the renderer (needs TeX) and answer with the "
                        "best one whose drawing matches the image; JSON says `verified`")
    p.add_argument("--format", "-f", choices=["plain", "inline", "display", "json"], default="plain",
                   help="plain LaTeX, $...$, $$...$$, or JSON lines {file, latex, seconds}")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per decoding pass (default 64: a folder reads ~1.5x faster "
                        "than at 16, bench/folder.py)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (decompression bombs)")
    p.add_argument("--names", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix plain/inline/display lines with the file name (default: when "
                        "there is more than one input)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party_warnings()
    try:
        model = LatexOCR(args.checkpoint, config=args.config, tokenizer=args.tokenizer,
                         device=args.device, backend=args.backend, beam_width=args.beam,
                         batch_size=args.batch_size, max_pixels=args.max_pixels,
                         verify=args.verify, model=args.model)
    except Exception as e:  # a missing/foreign checkpoint, config or tokenizer: say which and stop
        print(f"pix2tex: error: {e}", file=sys.stderr)
        sys.exit(2)
    inputs = expand_inputs(args.images)
    if not inputs:
        print("pix2tex: error: no image files found in the given folders", file=sys.stderr)
        sys.exit(1)
    show_name = args.names if args.names is not None else len(inputs) > 1
    failed = 0
    stdin_bytes = None
    per_read = 8 * args.batch_size  # read() sorts these by size: batches of similar pages
    for start in range(0, len(inputs), per_read):
        chunk = inputs[start:start + per_read]
        pages, crops, seconds, names = [], [], [], []
        for name in chunk:
            t0 = time.perf_counter()
            if name == "-":
                if stdin_bytes is None:
                    stdin_bytes = sys.stdin.buffer.read()
                source, name = stdin_bytes, "<stdin>"
            else:
                source = name
            try:
                page, crop = model.prepare(source)  # with --verify, also the image's ink at its scale
            except ImageError as e:
                msg = str(e) if str(e).startswith(name) else f"{name}: {e}"
                print(f"pix2tex: error: {msg}", file=sys.stderr)
                failed += 1
                page, crop = False, None  # placeholder: printed as an error, not a result
            pages.append(page)
            crops.append(crop)
            seconds.append(time.perf_counter() - t0)
            names.append(name)
        good = [i for i, p in enumerate(pages) if p is not False]
        t0 = time.perf_counter()
        readings = model.read([pages[i] for i in good], crops=[crops[i] for i in good])
        share = (time.perf_counter() - t0) / max(1, len(good))
        for i, reading in zip(good, readings):
            print(format_result(args.format, names[i], reading, seconds[i] + share, show_name), flush=True)
    if failed:
        print(f"pix2tex: {failed} of {len(inputs)} inputs could not be read", file=sys.stderr)
        sys.exit(1)
    return 0


if __name__ == "__main__":
    main()
