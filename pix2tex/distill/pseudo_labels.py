"""Sequence-level KD labels (Kim & Rush, 2016): the training set relabelled by the teacher's beam search.

    python -m pix2tex.distill.pseudo_labels --config settings/distill/beamsearch.yaml
    python -m pix2tex.distill.pseudo_labels --teacher-ckpt teacher.pth --data train.pkl --out bs.pkl

Every sample of the training pkl that fits the teacher is decoded with beam search (width
`distill.beam_width`, default 5), in batches of one image size, in the pkl's plan order. Written:

- `bs.pkl`: the same images; each label is the teacher's best beam, its token ids kept as they are
  (the formula text is their decoding). Samples whose beam never ended (no EOS within twice the
  longest ground-truth label, or --max-len) or ended empty are left out and counted.
- `bs.lst`: those labels as text, one per line, in the pkl's sample order (the distillation seed's
  `new_BS_data.lst`).
- `bs.json`: what made it: a digest of the teacher's weights, its decoding precision (fp32 by
  default), the source pkl, beam width, counts. distill refuses pseudo labels made by another
  teacher or in another precision than its `eval_precision`.

Resumable: each finished batch is appended to `bs.pkl.partial` (a JSON line, flushed and synced);
a restart with the same teacher, data and settings skips the batches already there. The pkl is
written atomically at the end, then the partial file is removed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch

from pix2tex.config import ConfigError
from pix2tex.distill.teacher import model_digest
from pix2tex.fileio import atomic_write_text


def dataset_digest(data) -> str:
    """sha256 of a dataset's samples (image paths, sizes, label ids)."""
    h = hashlib.sha256()
    for path, w, h_, ids in zip(data.paths, data.widths, data.heights, data.ids):
        h.update(f"{path}|{w}|{h_}|".encode())
        h.update(np.asarray(ids, dtype="<i4").tobytes())
    return h.hexdigest()


def sidecar_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".json"


def list_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".lst"


def _read_partial(path: str, header: dict, plan: list) -> dict[int, list]:
    """Finished batches of an earlier run: {plan position: [label ids or None per sample]}. A torn
    last line (killed mid-write) is dropped and the file rewritten without it."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    good, done = [], {}
    for n, line in enumerate(lines):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # only the last line may be torn
                break
            raise ValueError(f"{path}: line {n + 1} is not JSON; delete the file to start over")
        if n == 0:
            if record.get("header") != header:
                raise ValueError(f"{path} was made with another teacher, dataset or settings "
                                 f"({record.get('header')} vs {header}); delete it to start over")
        else:
            b = record["batch"]
            if b >= len(plan) or record["indices"] != list(plan[b]):
                raise ValueError(f"{path}: line {n + 1} does not match the batch plan; delete it")
            done[b] = record["labels"]
        good.append(line)
    if len(good) != sum(1 for line in lines if line):  # drop the torn tail
        atomic_write_text(path, "".join(line + "\n" for line in good))
    return done


def labels_of(ids: torch.Tensor, eos: int) -> list:
    """Per row of generate's output: the tokens before EOS, or None if the row has no EOS."""
    out = []
    for row in ids.tolist():
        out.append(row[:row.index(eos)] if eos in row else None)
    return out


def make_pseudo_labels(teacher, data, out: str, *, beam_width: int = 5, batchsize: int = 16,
                       length_penalty: float = 1.0, device="cpu", min_dimensions=(32, 32),
                       max_len: int | None = None, progress: bool = False,
                       max_new_batches: int | None = None, precision: str = "fp32") -> dict | None:
    """Decode `data` (an Im2LatexDataset) with the teacher's beam search and write `out` (pkl),
    its .lst and .json (see the module docstring). Returns the .json's content, or None when
    `max_new_batches` stopped the run early (the partial file then holds the progress).

    `data` is decoded under the teacher's limits (max_seq_len, max image size); its settings are
    restored afterwards, and the new pkl keeps them. `max_len` caps the tokens of a label
    (default: twice the longest ground-truth label + 8, within max_seq_len): a beam that runs
    longer is a loop, not a formula, and would hold its whole batch for hundreds of steps.
    `precision` is what the teacher decodes in (fp32 by default: the same labels on every CPU); it
    is recorded beside the teacher's digest, and distill refuses labels of another precision."""
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width} must be >= 1")
    teacher.to(device).eval()
    settings = data.settings()
    if max_len is None:
        max_len = 2 * max((len(t) for t in data.ids), default=0) + 8
    max_len = min(max_len, teacher.max_seq_len - 2) + 1  # + EOS; BOS + label + EOS fits max_seq_len
    header = {"teacher": model_digest(teacher), "precision": precision,
              "data": dataset_digest(data), "beam_width": beam_width,
              "batchsize": batchsize, "length_penalty": length_penalty, "max_len": max_len,
              "min_dimensions": list(min_dimensions)}
    partial = out + ".partial"
    try:
        data.update(batchsize=batchsize, shuffle=False, transform="test", keep_smaller_batches=True,
                    max_seq_len=teacher.max_seq_len, min_dimensions=tuple(min_dimensions),
                    max_dimensions=(teacher.max_width, teacher.max_height))
        plan = data.batch_plan(0)
        done = _read_partial(partial, header, plan)
        if not done:
            atomic_write_text(partial, json.dumps({"header": header}) + "\n")
        generate = {"max_len": max_len, "beam_width": beam_width, "length_penalty": length_penalty,
                    "precision": precision}
        if not _decode_batches(teacher, data, plan, done, partial, device, generate, progress,
                               max_new_batches):
            return None
        labels = {i: lab for b, batch in enumerate(plan) for i, lab in zip(batch, done[b])}
    finally:
        data.update(**settings)
    meta = _write_labels(data, labels, out, header, settings)
    os.unlink(partial)
    return meta


def _decode_batches(teacher, data, plan: list, done: dict, partial: str, device, generate: dict,
                    progress: bool, max_new_batches: int | None) -> bool:
    """Decode the batches of `plan` that `done` lacks into it, each appended to the `partial` file
    as it finishes (flushed and synced: a kill loses at most the batch in flight). False when
    `max_new_batches` stopped the run before the end."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(plan), initial=len(done), desc="pseudo labels", unit="batch",
                   dynamic_ncols=True)
    todo = [b for b in range(len(plan)) if b not in done]
    try:
        with open(partial, "a", encoding="utf-8") as f:
            for count, b in enumerate(todo):
                if max_new_batches is not None and count >= max_new_batches:
                    return False
                images, _ = data.load_batch(plan[b], 0, b)
                ids = teacher.generate(images.to(device), **generate)
                done[b] = labels_of(ids.cpu(), teacher.eos)
                f.write(json.dumps({"batch": b, "indices": list(plan[b]), "labels": done[b]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return True


def _write_labels(data, labels: dict, out: str, header: dict, settings: dict) -> dict:
    """Write `out` (pkl), its .lst and .json from `labels` (sample index -> the teacher's label ids,
    None without EOS); samples without a label are left out. Returns the .json's content."""
    from pix2tex.dataset.dataset import Im2LatexDataset

    keep = [i for i in sorted(labels) if labels[i]]
    if not keep:
        raise ValueError(f"the teacher finished none of the {len(labels)} formulas it decoded "
                         f"(no EOS within {header['max_len']} tokens, or empty): is it trained? "
                         f"({out}.partial keeps its outputs)")
    ids = [np.asarray(labels[i], dtype=np.int32) for i in keep]
    formulas = data.tokenizer.decode_batch([labels[i] for i in keep])
    new = Im2LatexDataset.from_samples(data.root, [data.paths[i] for i in keep], formulas,
                                       [data.widths[i] for i in keep],
                                       [data.heights[i] for i in keep], ids, data.tokenizer_path,
                                       **settings)
    new.save(out)
    atomic_write_text(list_path(out), "".join(f + "\n" for f in formulas))
    changed = sum(1 for i, f in zip(keep, formulas) if f != data.formulas[i])
    meta = {**header, "source_samples": len(data.formulas), "decoded": len(labels),
            "samples": len(keep), "unfinished": sum(1 for v in labels.values() if v is None),
            "empty": sum(1 for v in labels.values() if v == []),
            "differ_from_ground_truth": changed, "pkl": out, "list": list_path(out)}
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
    return meta


def check_pseudo_labels(path: str, teacher_digest: str, precision: str = "fp32") -> None:
    """Refuse pseudo labels that another teacher made, or that it decoded in another precision
    (their sidecar .json records both; labels from before the record were decoded in 'auto')."""
    meta_path = sidecar_path(path)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{path} has no {meta_path} beside it, so which teacher made it is "
                          f"unknown; remake it with `python -m pix2tex.distill.pseudo_labels`")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("teacher") != teacher_digest:
        raise ConfigError(f"{path} holds the beam outputs of another teacher (weights differ from "
                          f"distill.teacher_ckpt); delete it and remake it with "
                          f"`python -m pix2tex.distill.pseudo_labels`")
    made_in = meta.get("precision", "auto")
    if made_in != precision:
        raise ConfigError(f"{path} was decoded by the teacher in {made_in}, but eval_precision is "
                          f"{precision}: remake it (delete it and run `python -m "
                          f"pix2tex.distill.pseudo_labels`) or set eval_precision={made_in}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m pix2tex.distill.pseudo_labels",
        description="Relabel a training pkl with the teacher's beam-search outputs (sequence-level "
                    "KD). Defaults come from a distill config: its teacher (distill.teacher_ckpt, "
                    "distill.teacher_config), `data`, distill.pseudo_labels (output) and "
                    "distill.beam_width. Resumable: run it again after an interruption.")
    p.add_argument("--config", help="distill config (student config with a distill group)")
    p.add_argument("--student", help="a student config replacing the one --config extends")
    p.add_argument("--teacher-ckpt", help="teacher checkpoint (default: distill.teacher_ckpt)")
    p.add_argument("--teacher-config", help="teacher config (default: distill.teacher_config, "
                                            "else the checkpoint's)")
    p.add_argument("--data", help="training pkl to relabel (default: the config's data)")
    p.add_argument("--out", help="pkl to write (default: distill.pseudo_labels)")
    p.add_argument("--beam-width", type=int, help="default: distill.beam_width (5)")
    p.add_argument("--batchsize", type=int, help="images per batch (default: testbatchsize)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-len", type=int, help="longest label in tokens (default: twice the "
                                               "longest ground-truth label + 8)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: the config's device)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8", "auto"),
                   help="the teacher's decoding precision (default: the config's eval_precision, fp32)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    from pix2tex.checkpoint import CheckpointError
    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import DatasetError, Im2LatexDataset
    from pix2tex.dataset.tokenizer import TokenizerError
    from pix2tex.distill.teacher import load_teacher
    from pix2tex.models import resolve_device

    try:
        cfg = load_config(args.config, args.overrides, extends=args.student)
        d = cfg.distill
        data_path, out = args.data or cfg.data, args.out or d.pseudo_labels
        if not data_path:
            raise ConfigError("no training data: pass --data train.pkl or set `data` in the config")
        if not out:
            raise ConfigError("no output: pass --out labels.pkl or set distill.pseudo_labels")
        device = resolve_device(args.device or cfg.device)
        teacher, tcfg, _ = load_teacher(args.teacher_ckpt or d.teacher_ckpt,
                                        args.teacher_config or d.teacher_config, device)
        data = Im2LatexDataset.load(data_path)
        meta = make_pseudo_labels(teacher, data, out, beam_width=args.beam_width or d.beam_width,
                                  batchsize=args.batchsize or cfg.testbatchsize,
                                  length_penalty=args.length_penalty, device=device,
                                  max_len=args.max_len,
                                  min_dimensions=(tcfg.min_width, tcfg.min_height), progress=True,
                                  precision=args.precision or cfg.eval_precision)
    except (ConfigError, CheckpointError, DatasetError, TokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{out}: {meta['samples']} of {meta['source_samples']} samples relabelled by the teacher "
          f"(beam width {meta['beam_width']}, {meta['precision']}; "
          f"{meta['differ_from_ground_truth']} differ from the ground truth; left out: {meta['unfinished']} without EOS, {meta['empty']} empty, "
          f"{meta['source_samples'] - meta['decoded']} outside the teacher's limits); labels also "
          f"in {meta['list']}")


if __name__ == "__main__":
    main()
