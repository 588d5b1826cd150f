"""Evaluation: `python -m pix2tex.eval --checkpoint run/best.pth --data test.pkl [key=value ...]`.

Runs the model over a dataset pkl (greedy, sampling or beam search), scores the predictions with
`pix2tex.metrics` and writes `metrics.json` and `predictions.tsv` (image, ground truth, prediction,
per-sample edit distance) to the output folder. Without a model, it scores a predictions file
against a references file (one formula per line), as the distillation seed's BLEU.py does:

    python -m pix2tex.eval --predictions pred.txt --references ref.txt [--image-match]
    python -m pix2tex.eval --predictions outputs/eval/predictions.tsv   # re-score an earlier run

A folder of your own images (screenshots, scans) is scored against their formulas, one per line in
the images' name order (raw LaTeX is normalized first):

    python -m pix2tex.eval --images my_images/ --references formulas.txt [--checkpoint ...]

LaTeX-OCR's flags work as there: -c/--checkpoint, -d/--data, -b/--batchsize, -t/--temperature,
-n/--num-batches, --no-cuda, --debug, --config. One difference: decoding is greedy unless -t is
given (LaTeX-OCR sampled at 0.333 by default).
"""
from __future__ import annotations

from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from typing import Sequence

from pix2tex import metrics as M
from pix2tex.fileio import atomic_write_text, file_sha256

METRIC_ROWS = ("bleu", "latex_ocr_bleu", "edit_distance", "token_edit_accuracy", "token_accuracy",
               "exact_match", "image_match", "n")


# --- running the model -----------------------------------------------------------------------

def prepare_dataset(dataset, cfg, batchsize: int):
    """Test batching: fixed order, no augmentation, every sample that fits the model (the last,
    smaller batch of each size bucket included)."""
    return dataset.update(batchsize=batchsize, shuffle=False, transform="test", keep_smaller_batches=True,
                          max_seq_len=cfg.max_seq_len, max_dimensions=(cfg.max_width, cfg.max_height),
                          min_dimensions=(cfg.min_width, cfg.min_height))


def evaluate(model, dataset, tokenizer, *, beam_width: int = 1, temperature: float = 0.0,
             max_batches: int | None = None, device="cpu", image_match: bool = False,
             progress: bool = True, max_len: int | None = None, seed: int = 0,
             render_dir: str | None = None, workers: int | None = None,
             precision: str = "fp32") -> tuple[dict, list[dict]]:
    """Predict every batch of `dataset.batch_plan(0)` (the first `max_batches`), then score.

    The ground truth is the dataset's formula (not a tokenizer round trip). Sampling
    (temperature > 0) draws from a generator seeded with `seed`, so a run repeats. `precision`
    is what decodes (fp32 by default, so the scores do not depend on the CPU's int8/bf16 units).
    Returns (metrics as `metrics.compute_metrics`, one record per sample: `image`,
    `ground_truth`, `prediction`, `edit_distance` and, with image match, `image_match`).
    """
    import torch
    from tqdm.auto import tqdm

    device = torch.device(device)
    plan = dataset.batch_plan(0)
    if max_batches is not None:
        plan = plan[:max_batches]
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    model.to(device)
    indices: list[int] = []
    preds: list[str] = []
    positions: list[range] = []  # each batch's positions in preds (LaTeX-OCR's BLEU is per batch)
    for b, batch in enumerate(tqdm(plan, desc="eval", unit="batch", disable=not progress)):
        images, _ = dataset.load_batch(batch, 0, b)
        ids = model.generate(images.to(device), max_len=max_len, temperature=temperature,
                             beam_width=beam_width, generator=generator, precision=precision)
        positions.append(range(len(preds), len(preds) + len(batch)))
        preds += tokenizer.decode_batch(ids.tolist())
        indices += list(batch)
    refs = [dataset.formula(i) for i in indices]
    matches = M.image_match(preds, refs, render_dir=render_dir, workers=workers,
                            progress=progress) if image_match else None
    scores = M.compute_metrics(preds, refs, image_matches=matches)
    # LaTeX-OCR's own BLEU figure is this, over its evaluation batches: for comparisons with it
    scores["latex_ocr_bleu"] = M.latex_ocr_bleu(preds, refs, batches=positions)
    records = []
    for k, (i, p, r) in enumerate(zip(indices, preds, refs)):
        rec = {"image": dataset.image_path(i), "ground_truth": r, "prediction": p,
               "edit_distance": M.edit_distance(p, r)}
        if matches is not None:
            rec["image_match"] = matches[k]
        records.append(rec)
    return scores, records


# --- files -----------------------------------------------------------------------------------

def write_outputs(folder: str, scores: dict, records: Sequence[dict] | None, settings: dict) -> list[str]:
    """`metrics.json` ({settings, metrics}) and, given records, `predictions.tsv`; each written
    atomically. Returns the paths written."""
    paths = [os.path.join(folder, "metrics.json")]
    atomic_write_text(paths[0], json.dumps({"settings": settings, "metrics": scores}, indent=2) + "\n")
    if records:
        buf = io.StringIO()
        fields = list(records[0])
        writer = csv.DictWriter(buf, fields, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        paths.append(os.path.join(folder, "predictions.tsv"))
        atomic_write_text(paths[1], buf.getvalue())
    return paths


def read_lines(path: str) -> list[str]:
    """One formula per line; an empty line is an empty formula (it is kept, not skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def read_predictions_tsv(path: str) -> tuple[list[str], list[str]]:
    """(predictions, ground truths) of a `predictions.tsv` written by this module."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and not {"prediction", "ground_truth"} <= set(rows[0]):
        raise ValueError(f"{path}: a .tsv predictions file needs 'prediction' and 'ground_truth' "
                         f"columns (as eval.py writes); give plain text files with --references")
    return [r["prediction"] or "" for r in rows], [r["ground_truth"] or "" for r in rows]


# --- printing --------------------------------------------------------------------------------

def format_table(scores: dict) -> str:
    """Rows: metrics; columns: all samples, each reference-length bucket, the multi-line ones."""
    columns = [("all", scores)] + list(scores.get("by_length", {}).items())
    if "multi_line" in scores:
        columns.append(("multi-line", scores["multi_line"]))
    rows = [m for m in METRIC_ROWS if m in scores]
    head = f"{'metric':<20}" + "".join(f"{name:>11}" for name, _ in columns)
    lines = [head, "-" * len(head)]
    for m in rows:
        cells = []
        for _, col in columns:
            v = col.get(m)
            cells.append(f"{'-':>11}" if v is None else f"{v:>11d}" if m == "n" else f"{v:>11.4f}")
        lines.append(f"{m:<20}" + "".join(cells))
    r = scores.get("rerank")
    if r:
        def share(v):
            return "-" if v is None else f"{v:.4f}"
        lines.append(f"rerank (k={r['k']}): verified {share(r['verified'])}, precision "
                     f"{share(r['verified_precision'])}, coverage {share(r['verified_coverage'])}, "
                     f"{r['seconds_per_image']:.3f} s/image")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pix2tex.eval",
        description="Evaluate a checkpoint on a dataset pkl (BLEU-4, edit distances, token accuracy, "
                    "exact and image match, by reference length), or score a predictions file "
                    "against references without a model. Overrides are dotted key=value pairs.")
    # LaTeX-OCR's short flags (-c -d -b -t -n) and --no-cuda / --debug work as there
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("-c", "--checkpoint", help="model checkpoint (default: the config's load_ckpt; "
                                              "without --config, the shipped model models/pix2tex.pth)")
    p.add_argument("-d", "--data", help="dataset pkl (default: the config's testdata)")
    p.add_argument("--images", help="score a folder of your own images instead of a pkl: its image "
                                    "files in name order, paired line by line with --references")
    p.add_argument("--tokenizer", help="tokenizer.json (default: config, then checkpoint, then dataset)")
    p.add_argument("-b", "--batchsize", type=int, help="images per batch (default: testbatchsize)")
    p.add_argument("--beam-width", type=int, default=1, help="1: greedy/sampling; >1: beam search")
    p.add_argument("--rerank", type=int, default=0, metavar="K",
                   help="render-and-compare: K beam candidates per image, answer with the best one "
                        "whose rendering matches the image (the API's verify); reports the share "
                        "verified and its precision against image match (implies --image-match)")
    p.add_argument("-t", "--temperature", type=float, default=0.0,
                   help="0: greedy (default; LaTeX-OCR's default was sampling at 0.333); >0: seeded "
                        "sampling at this temperature")
    p.add_argument("-n", "--num-batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--output", help="output folder (default: <output_path>/eval)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's device)")
    p.add_argument("--no-cuda", action="store_true", help="run on the CPU (= --device cpu)")
    p.add_argument("--debug", action="store_true", help="DEBUG-level log messages")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8", "auto"),
                   help="decoding precision (default: the config's eval_precision, fp32); int8 and "
                        "bf16 are faster on some CPUs but change outputs slightly")
    p.add_argument("--image-match", action="store_true",
                   help="also render predictions and references and compare the images (slow)")
    p.add_argument("--workers", type=int, help="rendering processes for --image-match")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--predictions", help="score this file instead of running a model: one formula "
                                         "per line, or a predictions.tsv written by eval")
    p.add_argument("--references", help="reference formulas, one per line (with --predictions or "
                                        "--images; raw LaTeX is normalized first)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def score_predictions(preds: list[str], refs: list[str], args) -> dict:
    """The metrics of predictions made outside `evaluate` (image match with --image-match)."""
    matches = M.image_match(preds, refs, workers=args.workers, progress=not args.no_progress) \
        if args.image_match else None
    return M.compute_metrics(preds, refs, image_matches=matches)


def score_files(args) -> tuple[dict, list[dict], dict]:
    """--predictions [--references]: metrics of a predictions file, no model."""
    if args.references:
        preds, refs = read_lines(args.predictions), read_lines(args.references)
        if len(preds) != len(refs):
            raise ValueError(f"{args.predictions} has {len(preds)} lines but {args.references} has "
                             f"{len(refs)}; they must pair line by line")
    elif args.predictions.endswith(".tsv"):
        if not os.path.isfile(args.predictions):
            raise FileNotFoundError(f"file not found: {args.predictions}")
        preds, refs = read_predictions_tsv(args.predictions)
    else:
        raise ValueError(f"--predictions {args.predictions} needs --references (one formula per line)")
    scores = score_predictions(preds, refs, args)
    settings = {"predictions": args.predictions, "references": args.references or args.predictions}
    return scores, [], settings


def score_images(args) -> tuple[dict, list[dict], dict]:
    """--images DIR --references FILE: read a folder of images with the model (the API's
    preprocessing, scale normalization included) and score them against the references."""
    from dataset_tools.normalize import NormalizeError, normalize
    from pix2tex.predict import LatexOCR, expand_inputs

    if not args.references:
        raise ValueError(f"--images {args.images} needs --references FILE: the formula of each "
                         f"image, one per line, in the images' name order")
    if not os.path.isdir(args.images):
        raise FileNotFoundError(f"--images: folder not found: {args.images}")
    files = expand_inputs([args.images])
    refs = read_lines(args.references)
    if len(files) != len(refs):
        raise ValueError(f"{args.images} has {len(files)} images but {args.references} has "
                         f"{len(refs)} lines; they pair in order (image names sorted)")
    not_normalized = []  # kept as written (whitespace collapsed), listed in metrics.json
    for i, ref in enumerate(refs):
        try:
            refs[i] = normalize(ref)
        except NormalizeError as e:
            refs[i] = " ".join(ref.split())
            not_normalized.append(f"{args.references}:{i + 1}: {e}")
    device = args.device or "auto"
    precision = args.precision or "fp32"
    scores, records, settings = read_and_score(args, files, refs, args.checkpoint, args.config)
    settings.update(data=args.images, references=args.references,
                    references_not_normalized=not_normalized)
    return scores, records, settings


def read_and_score(args, files: list[str], refs: list[str], checkpoint, config) -> tuple[dict, list[dict], dict]:
    """Read image files with the API (`LatexOCR`: its preprocessing, and with --rerank K its
    render-and-compare verification) and score the answers against `refs`."""
    from pix2tex.predict import LatexOCR

    device = args.device or "auto"
    precision = args.precision or "fp32"
    rerank = args.rerank or 0
    ocr = LatexOCR(checkpoint, config=config, overrides=args.overrides, tokenizer=args.tokenizer,
                   device=device, beam_width=args.beam_width, temperature=args.temperature,
                   batch_size=args.batchsize or 16, precision=precision, verify=rerank > 0,
                   verify_width=max(rerank, 1))
    t0 = time.perf_counter()
    pages, crops = [], []
    for f in files:  # with --rerank, candidates are compared with each image's ink at its scale
        page, crop = ocr.prepare(f)
        pages.append(page)
        crops.append(crop)
    readings = ocr.read(pages, crops=crops)
    seconds = time.perf_counter() - t0
    preds = [r.latex for r in readings]
    # with --rerank, the precision of `verified` is measured against image match
    matches = M.image_match(preds, refs, workers=args.workers, progress=not args.no_progress) \
        if args.image_match or rerank else None
    scores = M.compute_metrics(preds, refs, image_matches=matches)
    # reading time through the API (preprocessed pages in, answers out; verification included)
    scores["seconds_per_image"] = round(seconds / max(len(files), 1), 4)
    records = [{"image": f, "prediction": r.latex, "ground_truth": ref, "confidence": r.confidence,
                **({"verified": r.verified} if rerank else {})}
               for f, r, ref in zip(files, readings, refs)]
    if rerank:
        verified = [bool(r.verified) for r in readings]
        n_verified, n_matched = sum(verified), sum(matches)
        scores["rerank"] = {
            "k": rerank, "verified": n_verified / max(len(files), 1),
            # of the verified answers, the share that image match confirms
            "verified_precision": (sum(v and m for v, m in zip(verified, matches)) / n_verified
                                   if n_verified else None),
            # of the image-matched answers, the share that verified
            "verified_coverage": (sum(v and m for v, m in zip(verified, matches)) / n_matched
                                  if n_matched else None),
            "seconds_per_image": round(seconds / max(len(files), 1), 4)}
    settings = {"checkpoint": ocr.checkpoint, "beam_width": args.beam_width, "rerank": rerank,
                "temperature": args.temperature, "device": device, "precision": precision,
                "output": args.output or os.path.join("outputs", "eval")}
    return scores, records, settings


def run_model(args) -> tuple[dict, list[dict], dict]:
    """Load config, checkpoint, tokenizer and data as the options say, then `evaluate`."""
    import torch

    from pix2tex.checkpoint import CheckpointError, check_compatible, load_checkpoint, load_model_weights
    from pix2tex.config import ConfigError, load_config, to_dict
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import load_tokenizer
    from pix2tex.models import get_model, resolve_device
    from pix2tex.predict import default_checkpoint, resolve_tokenizer

    if args.config:
        cfg = load_config(args.config, args.overrides)
        checkpoint = args.checkpoint or cfg.load_ckpt
        if not checkpoint:
            raise ConfigError(f"no checkpoint: pass --checkpoint PATH or set load_ckpt in {args.config}")
        ckpt = load_checkpoint(checkpoint)
    else:
        # no model named: the shipped one ($PIX2TEX_CHECKPOINT or models/pix2tex.pth)
        checkpoint = args.checkpoint or str(default_checkpoint())
        if not os.path.isfile(checkpoint):
            raise ConfigError(f"no model: {checkpoint} not found; pass --checkpoint PATH (and "
                              f"--config if it is a bare weights file), or --predictions FILE "
                              f"--references FILE to score a file")
        ckpt = load_checkpoint(checkpoint)
        if not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{checkpoint} holds no config (a bare weights file); pass --config "
                                  f"with the one it was trained with")
        cfg = load_config(None, args.overrides, base=ckpt["config"])
    data_path = args.data or cfg.testdata
    if not data_path:
        raise ConfigError("no test data: pass --data test.pkl or set testdata in the config")
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"dataset file not found: {data_path}")
    dataset = Im2LatexDataset.load(data_path)
    if args.rerank:  # the API's path: image files, verification
        n = len(dataset.paths) if not args.num_batches else args.num_batches * (args.batchsize or 16)
        files = [os.path.join(dataset.root, p) for p in dataset.paths[:n]]
        scores, records, settings = read_and_score(args, files, dataset.formulas[:n], checkpoint,
                                                   args.config)
        settings.update(data=data_path, samples_in_data=len(dataset.paths))
        return scores, records, settings
    # --tokenizer, then the config's, then the one the checkpoint was trained with, then the pkl's;
    # each as written and then beside the checkpoint (a run folder can be moved).
    # A release names no tokenizer: its own sits beside it and comes before the dataset's.
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "tokenizer.json")
    tok_path = resolve_tokenizer([args.tokenizer, cfg.tokenizer, ckpt.get("tokenizer"),
                                  None if ckpt.get("tokenizer") else beside,
                                  dataset.tokenizer_path], checkpoint)
    tokenizer = load_tokenizer(tok_path)
    if len(tokenizer) > cfg.num_tokens:
        raise ConfigError(f"the tokenizer {tok_path} has {len(tokenizer)} tokens but the model has "
                          f"num_tokens={cfg.num_tokens}: it is not the tokenizer of this model")
    # a checkpoint records its tokenizer's hash: refuse another one
    check_compatible(ckpt, to_dict(cfg), file_sha256(tok_path), checkpoint, tok_path)

    device = resolve_device(args.device or cfg.device)
    model = get_model(cfg)
    load_model_weights(model, ckpt, checkpoint)
    batchsize = args.batchsize or cfg.testbatchsize
    prepare_dataset(dataset, cfg, batchsize)
    if not dataset.batch_plan(0):
        raise ConfigError(f"{data_path}: no sample fits max_seq_len={cfg.max_seq_len} and images "
                          f"within {cfg.max_width}x{cfg.max_height}")
    temperature = args.temperature
    precision = args.precision or cfg.eval_precision
    scores, records = evaluate(model, dataset, tokenizer, beam_width=args.beam_width,
                               temperature=temperature, max_batches=args.num_batches, device=device,
                               image_match=args.image_match, progress=not args.no_progress,
                               max_len=cfg.max_seq_len, seed=cfg.seed, workers=args.workers,
                               precision=precision)
    settings = {"checkpoint": checkpoint, "data": data_path, "tokenizer": tok_path,
                "beam_width": args.beam_width, "temperature": temperature, "batchsize": batchsize,
                "num_batches": args.num_batches, "device": str(device), "precision": precision,
                "samples_in_data": len(dataset.samples), "samples_fitting": len(dataset.indices),
                "output": args.output or os.path.join(cfg.output_path, "eval")}
    return scores, records, settings


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG)
    if args.no_cuda:  # LaTeX-OCR's flag
        args.device = "cpu"
    errors: tuple = (ValueError, OSError)  # ConfigError, DatasetError, TokenizerError are ValueErrors
    if not args.predictions:  # scoring a file needs no torch
        from pix2tex.checkpoint import CheckpointError
        errors += (CheckpointError,)
    start = time.time()
    try:
        if args.predictions:
            scores, records, settings = score_files(args)
        elif args.images:
            scores, records, settings = score_images(args)
        else:
            scores, records, settings = run_model(args)
        output = args.output or settings.get("output")
        paths = write_outputs(output, scores, records, settings) if output else []
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if "beam_width" in settings:
        mode = (f"beam search (width {settings['beam_width']})" if settings["beam_width"] > 1 else
                "greedy" if settings["temperature"] <= 0 else f"sampling (T={settings['temperature']})")
        print(f"{settings['checkpoint']} on {settings['data']}: {scores['n']} samples, {mode}, "
              f"{settings['precision']}, {time.time() - start:.1f}s")
    else:
        print(f"{settings['predictions']} vs {settings['references']}: {scores['n']} samples")
    print(format_table(scores))
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
