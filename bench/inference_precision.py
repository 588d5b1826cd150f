#!/usr/bin/env python
"""Does reduced-precision inference change what a trained model writes?

A model is trained on rendered formulas until its float32 greedy decoding reproduces them (or for
--minutes), then decodes in float32, bf16 (encoder + decoder) and int8 (dynamic int8 decoder
linears, bf16 encoder) three sets of images, counting outputs token-for-token identical to
float32's:
  train       the training images (what a trained model is sure of),
  rerendered  the same formulas drawn again at another resolution (new pixels: the model has to
              read them, and its logits are less certain),
  held_out    formulas it never saw (mostly wrong outputs; near-ties are common: the hard case).

    .venv/bin/python bench/inference_precision.py [--source synth|im2latex] [--train 96]
        [--minutes 6]
    .venv/bin/python bench/inference_precision.py --checkpoint best.pth --data val.pkl

With --checkpoint, no training: the checkpoint's model decodes the --data dataset's images.
Formulas come from dataset_tools.synth (short ones: --source synth) or the real im2latex
validation formulas (../shared/data/im2latex_val.norm.txt). Prints one JSON object; renders,
tokenizer and the trained weights go to --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "im2latex_val.norm.txt")
PRECISIONS = ("bf16", "int8")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prepare(opts) -> dict:
    """Render the formula sets, train a tokenizer on the training formulas, build datasets."""
    from dataset_tools.render import render_formulas
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import train_tokenizer

    if opts.source == "synth":
        from dataset_tools.synth import SynthConfig, generate
        lines = generate(opts.train + opts.test, seed=7,
                         config=SynthConfig(mean_tokens=14.0, max_tokens=30, max_depth=2))
    else:
        with open(DATA, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    train, held_out = lines[:opts.train], lines[opts.train:opts.train + opts.test]
    splits = {"train": (train, (110, 130), 0), "rerendered": (train, (150, 170), 1),
              "held_out": (held_out, (110, 130), 0)}
    tok_path = os.path.join(opts.workdir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        train_tokenizer(train, vocab_size=opts.vocab).save(tok_path)
    datasets = {}
    for name, (formulas, dpi, seed) in splits.items():
        text = os.path.join(opts.workdir, f"{name}.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.writelines(x + "\n" for x in formulas)
        images = os.path.join(opts.workdir, name)
        render_formulas(formulas, images, dpi=dpi, seed=seed, progress=False)
        datasets[name] = Im2LatexDataset.build(images, text, tok_path, batchsize=opts.batch,
                                               transform="test", keep_smaller_batches=True,
                                               max_seq_len=256)
    return datasets


def strip(ids: list[int], eos: int = 2, pad: int = 0) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else [i for i in ids if i != pad]


def train(model, ds, opts) -> list[float]:
    """AdamW on `ds` until the mean epoch loss is below 0.01 or --minutes pass."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    model.train()
    losses, t0, epoch = [], time.time(), 0
    while time.time() - t0 < opts.minutes * 60 and (not losses or losses[-1] > 0.01):
        total = n = 0
        for indices in ds.batch_plan(epoch):
            images, tgt = ds.load_batch(indices, epoch)
            loss = model(images, tgt)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total, n = total + loss.item(), n + 1
        losses.append(round(total / n, 4))
        log(f"epoch {epoch}: loss {losses[-1]} ({time.time() - t0:.0f} s)")
        epoch += 1
    model.eval()
    return losses


def compare(model, ds, max_len: int, limit: int | None = None) -> dict:
    """Greedy outputs in fp32 and each reduced precision over `ds`'s images (the first `limit`)."""
    outputs = {p: [] for p in ("fp32", *PRECISIONS)}
    labels = []
    ds.update(shuffle=False)
    for indices in ds.batch_plan(0):
        if limit is not None and len(labels) >= limit:
            break
        images, tgt = ds.load_batch(indices)
        labels += [strip(t[1:].tolist()) for t in tgt]
        for p in outputs:
            outputs[p] += [strip(o.tolist()) for o in model.generate(images, max_len=max_len,
                                                                       precision=p)]
    ref = outputs["fp32"]
    right = [r == lab for r, lab in zip(ref, labels)]
    entry = {"images": len(ref), "fp32_exact_match_label": sum(right)}
    for p in PRECISIONS:
        same = [o == r for o, r in zip(outputs[p], ref)]
        entry[f"{p}_identical_to_fp32"] = sum(same)
        # the check that matters: where float32 reads the formula right, is it still read right?
        entry[f"{p}_identical_where_fp32_right"] = sum(s and r for s, r in zip(same, right))
        entry[f"{p}_exact_match_label"] = sum(o == lab for o, lab in zip(outputs[p], labels))
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="synth", choices=["synth", "im2latex"])
    ap.add_argument("--train", type=int, default=96, help="training formulas")
    ap.add_argument("--test", type=int, default=96, help="held-out formulas")
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=6.0, help="training time limit")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="settings/config-tiny.yaml")
    ap.add_argument("--checkpoint", help="evaluate this trained checkpoint instead of training")
    ap.add_argument("--data", help="with --checkpoint: dataset .pkl whose images are decoded")
    ap.add_argument("--limit", type=int, default=512,
                    help="with --checkpoint: at most this many images")
    ap.add_argument("--workdir", default="/tmp/pix2tex-precision-check")
    opts = ap.parse_args()
    sys.path.insert(0, REPO)

    import torch
    from pix2tex.config import load_config
    from pix2tex.models import get_model

    torch.set_num_threads(opts.threads)
    if opts.checkpoint:
        from pix2tex.checkpoint import load_checkpoint, load_model_weights
        from pix2tex.dataset.dataset import Im2LatexDataset
        if not opts.data:
            ap.error("--checkpoint needs --data (a dataset .pkl)")
        ckpt = load_checkpoint(opts.checkpoint)
        cfg = load_config(base=ckpt["config"])
        model = get_model(cfg)
        load_model_weights(model, ckpt, opts.checkpoint)
        model.eval()
        ds = Im2LatexDataset.load(opts.data).update(batchsize=opts.batch, transform="test",
                                                   keep_smaller_batches=True)
        result = {"benchmark": "inference-precision-agreement", "checkpoint": opts.checkpoint,
                  "data": opts.data,
                  "images": compare(model, ds, cfg.max_seq_len - 1, limit=opts.limit)}
        print(json.dumps(result), flush=True)
        return

    os.makedirs(opts.workdir, exist_ok=True)
    data = prepare(opts)
    cfg = load_config(os.path.join(REPO, opts.config),
                      [f"num_tokens={len(data['train'].tokenizer)}", "max_seq_len=256"])
    torch.manual_seed(0)
    model = get_model(cfg)
    weights = os.path.join(opts.workdir, f"model-{opts.source}-{opts.train}-{opts.minutes}.pt")
    if os.path.isfile(weights):  # trained before with these settings
        saved = torch.load(weights, weights_only=True)
        model.load_state_dict(saved["model"])
        losses = saved["losses"]
        model.eval()
    else:
        losses = train(model, data["train"], opts)
        torch.save({"model": model.state_dict(), "losses": losses}, weights)
    result = {"benchmark": "inference-precision-agreement", "config": opts.config,
              "source": opts.source, "params": sum(p.numel() for p in model.parameters()),
              "train_formulas": opts.train, "held_out_formulas": opts.test,
              "epochs": len(losses), "final_loss": losses[-1] if losses else None}
    for name, ds in data.items():
        result[name] = compare(model, ds, 255)
        log(name, result[name])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
