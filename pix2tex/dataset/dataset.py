"""Im2LatexDataset: rendered formula images, bucketed by exact size, served as whole batches.

A dataset is built from a folder of images `{i:07d}.png` and the formula list they were rendered
from (image i <-> line i), plus a tokenizer. Formulas are tokenized once, at build time. Images
whose size, formula length or readability rule them out are counted in a `BuildReport`.

Batches: every batch holds images of one size (width, height), so no padding is needed. The batch
plan of an epoch is a pure function of (seed, epoch) and the augmentation of a batch a pure
function of (seed, epoch, batch index): a resumed run sees exactly the data an uninterrupted run
would, whatever the number of DataLoader workers.

    images: float32 [B, 1, H, W], normalized with transforms.MEAN/STD
    tgt:    int64   [B, T] = BOS, tokens, EOS, then PAD  (T = longest in the batch + 2)

A `.pkl` is a plain dict (lists, strings, ints, bytes) with image and tokenizer paths relative to
the pkl's folder, read back through a restricted unpickler.

LaTeX-OCR's calls work as there: `Im2LatexDataset(equations, images, tokenizer, **settings)`
builds (as `build`), `Im2LatexDataset().load(pkl)`, `save`, `combine`, `update(**config)` with a
whole config (the dataset's keys applied, the other config keys left alone, anything else an
error), `pad=True` (pad every image to `max_dimensions` with white) and
`generate_tokenizer(equations, output, vocab_size)`. One documented difference: iterating yields
`(images, tgt)` where LaTeX-OCR yielded `(tokenizer encoding, images)`; its `input_ids` are `tgt`
and its `attention_mask` is `tgt != PAD`.
"""
from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import asdict, dataclass, field
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from pix2tex.fileio import atomic_open, file_sha256

from .tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, LatexTokenizer, load_tokenizer,
                        read_formulas, train_tokenizer)

# torch and albumentations (.transforms) are imported where batches are loaded: building a pkl
# needs neither, and importing them costs seconds.

FORMAT = "pix2tex.Im2LatexDataset"
VERSION = 1

# Settings that `update` may change, with their defaults. Dimensions are (width, height).
SETTINGS = {
    "batchsize": 16,
    "shuffle": True,
    "max_seq_len": 512,  # BOS + tokens + EOS
    "min_dimensions": (32, 32),
    "max_dimensions": (672, 192),
    "transform": "test",  # 'train' (augmentation) | 'test' (normalization only)
    "seed": 0,
    "keep_smaller_batches": False,  # keep the last, smaller batch of each size bucket
    "epoch": 0,  # the epoch that `iter(dataset)` and `len(dataset)` refer to
    "skip_unknown": False,  # leave out labels with [UNK] (training: they cannot be learned)
    "pad": False,  # pad every image to max_dimensions with white (LaTeX-OCR's `pad`)
}


def config_only_keys() -> set[str]:
    """Config keys that set nothing on a dataset (model, optimizer, run): LaTeX-OCR calls
    `update(**args)` with its whole config, so `update` accepts these and leaves them. They are
    pix2tex.config's keys, LaTeX-OCR's flat ones, and what its parse_args adds (device, no_cuda)."""
    from pix2tex.config import DEFAULTS, RENAMED
    given_by_entry_points = {"device", "no_cuda", "resume", "notes", "config_path"}
    applied = set(SETTINGS) | {"tokenizer", "max_width", "max_height", "min_width", "min_height"}
    return (set(DEFAULTS) | set(RENAMED) | given_by_entry_points) - applied


class DatasetError(ValueError):
    """A dataset file, image or setting that cannot be used; the message names it."""


class Sample(NamedTuple):
    path: str  # relative to the dataset's `root`
    formula: str
    width: int
    height: int


@dataclass
class BuildReport:
    formulas: int = 0  # lines in the formula file
    kept: int = 0  # samples in the dataset's batches under the build settings
    empty: int = 0  # blank formula lines
    missing: int = 0  # no image: the renderer rejected the formula
    corrupt: list = field(default_factory=list)  # [(path, reason)] unreadable images
    too_small: int = 0
    too_large: int = 0
    too_long: int = 0  # BOS + tokens + EOS > max_seq_len
    unknown_chars: int = 0  # a character outside the tokenizer's alphabet ([UNK] in the label)

    def summary(self) -> str:
        lines = [f"formulas {self.formulas}: kept {self.kept}, missing image {self.missing}, "
                 f"corrupt {len(self.corrupt)}, empty {self.empty}, too small {self.too_small}, "
                 f"too large {self.too_large}, too long {self.too_long}, "
                 f"characters unknown to the tokenizer {self.unknown_chars} (kept; training skips "
                 f"them)"]
        lines += [f"  corrupt image {p}: {why}" for p, why in self.corrupt[:20]]
        if len(self.corrupt) > 20:
            lines.append(f"  ... and {len(self.corrupt) - 20} more corrupt images")
        return "\n".join(lines)


def unknown_labels(tok: LatexTokenizer, formulas: Sequence[str], ids: Sequence[np.ndarray]) -> list[bool]:
    """Which labels hold a character the tokenizer cannot encode: [UNK] in the ids, or for a
    tokenizer without [UNK] (LaTeX-OCR's drops such characters) a decoding that is not the
    formula (spaces aside)."""
    if tok.unk_id is not None:
        return [bool((t == tok.unk_id).any()) for t in ids]
    decoded = tok.decode_batch([t.tolist() for t in ids])
    return ["".join(f.split()) != "".join(d.split()) for f, d in zip(formulas, decoded)]


class _SafeUnpickler(pickle.Unpickler):
    """Reads only plain data: a pkl that names any other global (os.system, ...) is refused."""

    ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the header, after checking the file's chunks (catches torn files)."""
    with Image.open(path) as im:
        size = im.size
        im.verify()
    return size


def _read_image(path: str) -> np.ndarray:
    """Grayscale uint8 [H, W]; transparent pixels become white paper."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        return np.asarray(im.convert("L"))


def _rebase(paths: Sequence[str], old_root: str, new_root: str) -> list[str]:
    """Paths relative to `old_root` made relative to `new_root` (one relpath per folder: fast)."""
    cache: dict[str, str] = {}
    out = []
    for p in paths:
        folder, name = os.path.split(p)
        if folder not in cache:
            cache[folder] = os.path.relpath(os.path.join(old_root, folder), new_root)
        out.append(os.path.normpath(os.path.join(cache[folder], name)))
    return out


def _same_content(a: str | None, b: str | None) -> bool:
    """Both files exist and hold the same bytes (two copies of one tokenizer)."""
    sha = file_sha256(a)
    return sha is not None and sha == file_sha256(b)


def read_formula_lines(path: str | os.PathLike) -> list[str]:
    """Line i of the file is formula i (image `{i:07d}.png`); a trailing newline ends the last line."""
    with open(path, encoding="utf-8") as f:  # read exactly as dataset_tools/render.py does
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class Im2LatexDataset:
    """Formula images + token ids, bucketed by size. See the module docstring for the batches."""

    def __init__(self, equations: str | os.PathLike | None = None,
                 images: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | LatexTokenizer | None = None, *,
                 progress: bool = False, **settings):
        """An empty dataset, or (LaTeX-OCR's constructor) one built from the formula file
        `equations`, the folder `images` and `tokenizer`, as `build` does."""
        self._set_samples(os.getcwd(), [], [], [], [], [], None)
        for key, value in SETTINGS.items():
            setattr(self, key, value)
        self._reset_caches()
        if equations is not None or images is not None:
            if equations is None or images is None or tokenizer is None:
                raise DatasetError("Im2LatexDataset(equations, images, tokenizer): give the formula "
                                   "file, the images folder and the tokenizer.json, or none of them")
            self._read(images, equations, tokenizer, progress)
        self.update(**settings)
        if self.report is not None:
            self._count_filtered()

    def _set_samples(self, root, paths, formulas, widths, heights, ids, tokenizer_path) -> None:
        if not (len(paths) == len(formulas) == len(widths) == len(heights) == len(ids)):
            raise DatasetError("paths, formulas, widths, heights and ids must have the same length")
        self.root = os.path.abspath(root)
        self.paths = list(paths)
        self.formulas = list(formulas)
        self.widths = [int(w) for w in widths]
        self.heights = [int(h) for h in heights]
        self.ids = [np.asarray(t, dtype=np.int32) for t in ids]
        self.tokenizer_path = os.path.abspath(tokenizer_path) if tokenizer_path else None
        self.report: BuildReport | None = None

    @classmethod
    def from_samples(cls, root: str, paths: Sequence[str], formulas: Sequence[str],
                     widths: Sequence[int], heights: Sequence[int], ids: Sequence[np.ndarray],
                     tokenizer_path: str | None = None, **settings) -> "Im2LatexDataset":
        """A dataset of given samples: image `paths` relative to `root`, their formulas, sizes and
        token ids (without BOS/EOS) under `tokenizer_path`."""
        ds = cls()
        ds._set_samples(root, paths, formulas, widths, heights, ids, tokenizer_path)
        return ds.update(**settings)

    # --- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, images_dir: str | os.PathLike, formulas_file: str | os.PathLike,
              tokenizer: str | os.PathLike | LatexTokenizer, *, progress: bool = False,
              **settings) -> "Im2LatexDataset":
        """Pair `images_dir/{i:07d}.png` with line i of `formulas_file`; `settings` as in `update`.
        Missing images are counted, unreadable ones listed with their path in `dataset.report`."""
        return cls(formulas_file, images_dir, tokenizer, progress=progress, **settings)

    def _read(self, images_dir, formulas_file, tokenizer, progress: bool) -> None:
        root = os.path.abspath(images_dir)
        if not os.path.isdir(root):
            raise DatasetError(f"images folder not found: {root}")
        tok = tokenizer if isinstance(tokenizer, LatexTokenizer) else load_tokenizer(tokenizer)
        lines = read_formula_lines(formulas_file)
        existing = set(os.listdir(root))
        report = BuildReport(formulas=len(lines))
        paths, formulas, widths, heights = [], [], [], []
        items = enumerate(lines)
        if progress:
            from tqdm import tqdm
            items = tqdm(items, total=len(lines), desc=f"reading {os.path.basename(root)}", unit="img")
        for i, line in items:
            formula = " ".join(line.split())
            name = f"{i:07d}.png"
            if not formula:
                report.empty += 1
                continue
            if name not in existing:
                report.missing += 1
                continue
            try:
                w, h = _image_size(os.path.join(root, name))
            except Exception as e:  # PIL raises many types for broken files
                report.corrupt.append((os.path.join(root, name), f"{type(e).__name__}: {e}"))
                continue
            paths.append(name)
            formulas.append(formula)
            widths.append(w)
            heights.append(h)
        ids = [np.asarray(t, dtype=np.int32) for t in tok.encode_batch(formulas)]
        # A character the tokenizer never saw becomes [UNK]: counted here; training skips such
        # labels (`skip_unknown`), evaluation keeps them (it scores the formula text).
        report.unknown_chars = sum(unknown_labels(tok, formulas, ids))
        self._set_samples(root, paths, formulas, widths, heights, ids, tok.path)
        self._tokenizer = tok
        self.report = report

    def _count_filtered(self) -> None:
        """The build report's counts of samples the size and length limits leave out."""
        reasons = self._reasons()
        self.report.too_small = reasons.count("too_small")
        self.report.too_large = reasons.count("too_large")
        self.report.too_long = reasons.count("too_long")
        self.report.kept = reasons.count(None)

    # --- settings -------------------------------------------------------------------------
    def update(self, **settings) -> "Im2LatexDataset":
        """Change settings (see SETTINGS); `test=True/False` is LaTeX-OCR's spelling of transform.
        A whole config may be passed, as LaTeX-OCR did (`update(**args)`): `tokenizer` (a path)
        re-encodes the labels when its vocabulary differs, max/min_width/height set the
        dimensions when max/min_dimensions are not given, and the config keys that concern the
        model or the run (`config_only_keys`) change nothing. Any other key is an error."""
        settings = dict(settings)
        for side in ("max", "min"):
            w, h = settings.pop(f"{side}_width", None), settings.pop(f"{side}_height", None)
            if f"{side}_dimensions" not in settings and (w is not None or h is not None):
                old = getattr(self, f"{side}_dimensions")
                settings[f"{side}_dimensions"] = (old[0] if w is None else w, old[1] if h is None else h)
        if settings.get("tokenizer") is not None:
            self._use_tokenizer(settings.pop("tokenizer"))
        ignored = config_only_keys() | {"tokenizer"}
        for key, value in settings.items():
            if key == "test":
                key, value = "transform", "test" if value else "train"
            if key in ignored:
                continue
            if key not in SETTINGS:
                raise DatasetError(f"unknown dataset setting '{key}'; valid: {', '.join(SETTINGS)}, "
                                   f"test, tokenizer (and the config keys, which change nothing)")
            if key in ("min_dimensions", "max_dimensions"):
                if len(value) != 2 or min(int(v) for v in value) <= 0:
                    raise DatasetError(f"{key} must be (width, height) > 0, got {value!r}")
                value = (int(value[0]), int(value[1]))
            elif key in ("batchsize", "max_seq_len", "seed", "epoch"):
                low = 1 if key in ("batchsize", "max_seq_len") else 0
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                    raise DatasetError(f"{key} must be an integer >= {low}, got {value!r}")
                value = int(value)
            elif key == "transform" and value not in ("train", "test"):
                raise DatasetError(f"transform must be 'train' or 'test', got {value!r}")
            elif key in ("shuffle", "keep_smaller_batches", "skip_unknown", "pad"):
                value = bool(value)
            if key == "transform" and value != self.transform:
                self._transform = None
            setattr(self, key, value)
        self._indices = None
        self._plan = None
        return self

    def settings(self) -> dict:
        return {key: getattr(self, key) for key in SETTINGS}

    def _use_tokenizer(self, path: str | os.PathLike | LatexTokenizer) -> None:
        """Label the samples with another tokenizer; encoded again when its vocabulary differs."""
        tok = path if isinstance(path, LatexTokenizer) else load_tokenizer(path)
        if _same_content(tok.path, self.tokenizer_path):
            return
        self.ids = [np.asarray(t, dtype=np.int32) for t in tok.encode_batch(self.formulas)]
        self.tokenizer_path, self._tokenizer = tok.path, tok
        self._indices = self._plan = None

    def _reset_caches(self) -> None:
        self._indices: list[int] | None = None  # samples that pass the filters
        self._plan: tuple[int, list[list[int]]] | None = None  # (epoch, plan)
        self._transform = None
        self._tokenizer: LatexTokenizer | None = None
        self._samples: list[Sample] | None = None

    def __getstate__(self) -> dict:  # DataLoader workers under spawn: drop what is rebuilt lazily
        state = self.__dict__.copy()
        state.update(_transform=None, _tokenizer=None)
        return state

    # --- samples --------------------------------------------------------------------------
    def _reasons(self) -> list[str | None]:
        """Why each sample is out under the current settings (None: it is in)."""
        (min_w, min_h), (max_w, max_h) = self.min_dimensions, self.max_dimensions
        out = []
        unknown = self._unknown_labels() if self.skip_unknown else [False] * len(self.ids)
        for w, h, t, unk in zip(self.widths, self.heights, self.ids, unknown):
            if w < min_w or h < min_h:
                out.append("too_small")
            elif w > max_w or h > max_h:
                out.append("too_large")
            elif len(t) + 2 > self.max_seq_len:
                out.append("too_long")
            elif unk:
                out.append("unknown_chars")
            else:
                out.append(None)
        return out

    @property
    def indices(self) -> list[int]:
        """Indices of the samples that pass the size and length filters."""
        if self._indices is None:
            self._indices = [i for i, r in enumerate(self._reasons()) if r is None]
        return self._indices

    @property
    def samples(self) -> list[Sample]:
        """All stored samples (index i as in `image_path(i)`), filtered or not. Read-only."""
        if self._samples is None:
            self._samples = [Sample(*s) for s in zip(self.paths, self.formulas, self.widths, self.heights)]
        return self._samples

    def image_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def formula(self, i: int) -> str:
        return self.formulas[i]

    @property
    def tokenizer(self) -> LatexTokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise DatasetError("this dataset has no tokenizer path")
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _unknown_labels(self) -> list[bool]:
        """Which labels hold a character the tokenizer cannot encode (`unknown_labels`); by our
        [UNK] id when the pkl names no tokenizer file that is there."""
        if self._tokenizer is None and not (self.tokenizer_path and os.path.isfile(self.tokenizer_path)):
            return [bool((t == UNK_ID).any()) for t in self.ids]
        return unknown_labels(self.tokenizer, self.formulas, self.ids)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Sample indices by image size (width, height), in sample order."""
        out: dict[tuple[int, int], list[int]] = {}
        for i in self.indices:
            out.setdefault((self.widths[i], self.heights[i]), []).append(i)
        return out

    # --- batches --------------------------------------------------------------------------
    def batch_plan(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of an epoch as lists of sample indices: a pure function of (seed, epoch)
        and the settings. With `shuffle`, samples are shuffled within each size bucket and the
        batches across buckets."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for key, idx in sorted(self.buckets().items()):
            idx = np.asarray(idx)
            if self.shuffle:
                idx = rng.permutation(idx)
            for s in range(0, len(idx), self.batchsize):
                chunk = idx[s:s + self.batchsize]
                if len(chunk) == self.batchsize or self.keep_smaller_batches:
                    batches.append(chunk.tolist())
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        self._plan = (epoch, batches)
        return batches

    def _get_transform(self):
        if self._transform is None:
            from .transforms import get_transform
            self._transform = get_transform(self.transform)
        return self._transform

    def load_batch(self, indices: Sequence[int], epoch: int = 0, batch_index: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B,1,H,W] float32, tgt [B,T] int64) of the given samples. With the train
        transform, the augmentation is seeded by (seed, epoch, batch_index)."""
        import torch

        from .transforms import seed_transform
        if len(indices) == 0:
            raise DatasetError("load_batch needs at least one sample index")
        tf = self._get_transform()
        if self.transform == "train":
            seed = np.random.SeedSequence([self.seed, int(epoch), int(batch_index)]).generate_state(1, np.uint64)[0]
            seed_transform(tf, int(seed))
        images = []
        size = (self.widths[indices[0]], self.heights[indices[0]])
        for i in indices:
            img = _read_image(self.image_path(i))
            if (img.shape[1], img.shape[0]) != (self.widths[i], self.heights[i]):
                raise DatasetError(f"{self.image_path(i)}: image is {img.shape[1]}x{img.shape[0]}, the "
                                   f"dataset recorded {self.widths[i]}x{self.heights[i]}; rebuild the pkl")
            if (self.widths[i], self.heights[i]) != size:
                raise DatasetError(f"load_batch: sample {i} is {self.widths[i]}x{self.heights[i]}, sample "
                                   f"{indices[0]} is {size[0]}x{size[1]}; a batch must share one size")
            images.append(tf(image=img)["image"])
        if self.pad:  # LaTeX-OCR's `pad`: every batch at max_dimensions, white right and below
            from .transforms import MEAN, STD
            (max_w, max_h), white = self.max_dimensions, (1.0 - MEAN) / STD
            images = [torch.nn.functional.pad(im, (0, max_w - im.shape[-1], 0, max_h - im.shape[-2]),
                                              value=white) for im in images]
        lengths = [len(self.ids[i]) for i in indices]
        tgt = torch.full((len(indices), max(lengths) + 2), PAD_ID, dtype=torch.long)
        for row, i in enumerate(indices):
            n = lengths[row]
            tgt[row, 0] = BOS_ID
            tgt[row, 1:n + 1] = torch.from_numpy(self.ids[i].astype(np.int64))
            tgt[row, n + 1] = EOS_ID
        return torch.stack(images).float(), tgt

    def __len__(self) -> int:
        """Number of batches in epoch `self.epoch`."""
        return len(self.batch_plan(self.epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        for b, idx in enumerate(self.batch_plan(epoch)):
            yield self.load_batch(idx, epoch, b)

    # --- combine, save, load --------------------------------------------------------------
    def combine(self, other: "Im2LatexDataset") -> "Im2LatexDataset":
        """Append `other`'s samples to this dataset (in place; returns self)."""
        if other.tokenizer_path and self.tokenizer_path and other.tokenizer_path != self.tokenizer_path:
            if not _same_content(self.tokenizer_path, other.tokenizer_path):
                raise DatasetError(f"cannot combine datasets with different tokenizers: "
                                   f"{self.tokenizer_path} and {other.tokenizer_path}")
        self.paths += _rebase(other.paths, other.root, self.root)
        self.formulas += other.formulas
        self.widths += other.widths
        self.heights += other.heights
        self.ids += other.ids
        self.tokenizer_path = self.tokenizer_path or other.tokenizer_path
        self.report = None
        self._indices = self._plan = self._samples = None
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the pkl atomically; image and tokenizer paths are stored relative to its folder."""
        path = os.path.abspath(path)
        folder = os.path.dirname(path)
        state = {
            "format": FORMAT,
            "version": VERSION,
            "paths": _rebase(self.paths, self.root, folder),
            "formulas": self.formulas,
            "widths": self.widths,
            "heights": self.heights,
            "lengths": [len(t) for t in self.ids],
            "ids": b"".join(np.asarray(t, dtype="<i4").tobytes() for t in self.ids),
            "tokenizer": os.path.relpath(self.tokenizer_path, folder) if self.tokenizer_path else None,
            "settings": self.settings(),
            "report": asdict(self.report) if self.report else None,
        }
        with atomic_open(path, "wb") as f:
            f.write(pickle.dumps(state, protocol=4))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Im2LatexDataset":
        """Read a pkl written by `save`; any other pickle is refused without running its code."""
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise DatasetError(f"dataset file not found: {path}")
        try:
            with open(path, "rb") as f:
                state = _SafeUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise DatasetError(f"{path}: refused to load: {e}. Only pkls written by pix2tex's "
                               f"Im2LatexDataset.save are read (a LaTeX-OCR pkl must be rebuilt with "
                               f"`python -m pix2tex.dataset.dataset` or ./create_data.sh)") from None
        except Exception as e:
            raise DatasetError(f"{path}: not a readable dataset pkl ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise DatasetError(f"{path}: not a pix2tex dataset pkl (rebuild it with "
                               f"`python -m pix2tex.dataset.dataset`)")
        if state.get("version") != VERSION:
            raise DatasetError(f"{path}: dataset format version {state.get('version')} is not "
                               f"supported (expected {VERSION}); rebuild it")
        folder = os.path.dirname(path)
        flat = np.frombuffer(state["ids"], dtype="<i4").astype(np.int32)
        ends = np.cumsum(state["lengths"], dtype=np.int64)
        ids = np.split(flat, ends[:-1]) if len(ends) else []
        tok = state["tokenizer"]
        settings = {k: v for k, v in state["settings"].items() if k in SETTINGS}
        ds = cls.from_samples(folder, state["paths"], state["formulas"], state["widths"],
                              state["heights"], ids,
                              os.path.normpath(os.path.join(folder, tok)) if tok else None, **settings)
        if state.get("report"):
            ds.report = BuildReport(**state["report"])
            ds.report.corrupt = [tuple(c) for c in ds.report.corrupt]
        return ds


def generate_tokenizer(equations: str | os.PathLike | Sequence[str | os.PathLike],
                       output: str | os.PathLike, vocab_size: int = 8000) -> LatexTokenizer:
    """LaTeX-OCR's name: train a tokenizer on the formula file(s) `equations` and save it to
    `output`. It is this project's tokenizer (every LaTeX token kept whole, see tokenizer.py),
    not LaTeX-OCR's byte-level BPE."""
    paths = [equations] if isinstance(equations, (str, os.PathLike)) else list(equations)
    formulas = read_formulas(paths)
    if not formulas:
        raise DatasetError(f"no formulas in {', '.join(map(str, paths))}")
    tok = train_tokenizer(formulas, vocab_size)
    tok.save(output)
    return tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build a dataset pkl from rendered images and their formulas.")
    ap.add_argument("--images", required=True, help="folder of {i:07d}.png images")
    ap.add_argument("--formulas", required=True, help="formula list the images were rendered from")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--out", required=True, help="pkl to write")
    ap.add_argument("--max-seq-len", type=int, default=SETTINGS["max_seq_len"])
    ap.add_argument("--min-dims", type=int, nargs=2, metavar=("W", "H"), default=SETTINGS["min_dimensions"])
    ap.add_argument("--max-dims", type=int, nargs=2, metavar=("W", "H"), default=SETTINGS["max_dimensions"])
    ap.add_argument("--batchsize", type=int, default=SETTINGS["batchsize"])
    ap.add_argument("--seed", type=int, default=SETTINGS["seed"])
    args = ap.parse_args(argv)
    try:
        ds = Im2LatexDataset.build(args.images, args.formulas, args.tokenizer, progress=True,
                                   max_seq_len=args.max_seq_len, min_dimensions=args.min_dims,
                                   max_dimensions=args.max_dims, batchsize=args.batchsize, seed=args.seed)
        ds.save(args.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.out}: {ds.report.summary()}")
    if ds.report.kept == 0:
        print(f"warning: {args.out} has no usable samples")


if __name__ == "__main__":
    main()
