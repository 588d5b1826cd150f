#!/usr/bin/env python
"""Does reduced-precision inference change what a trained model writes?

Renders real im2latex formulas (../shared/data/im2latex_val.norm.txt; or with --source synth short
synthetic ones, which a tiny model learns to read in minutes), trains config-tiny on the first
--train of them for --minutes on the CPU, then decodes greedily the training images and
--test held-out images in float32, bf16 (encoder + decoder) and int8 (dynamic int8 decoder
linears, bf16 encoder) and counts the outputs that are token-for-token identical to float32's. The
model also reports how often float32 itself reproduces the label (how trained it is): on images
it has learned the logits are confident, on held-out ones near-ties are common, the hard case.

    .venv/bin/python bench/inference_precision.py [--train 256] [--test 128] [--minutes 8]

Prints one JSON object. Work files (renders, tokenizer, checkpoint) go to --workdir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "im2latex_val.norm.txt")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def prepare(opts):
    """Render the formulas, train a tokenizer, build train/test datasets (cached in workdir)."""
    from dataset_tools.render import render_formulas
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import train_tokenizer

    if opts.source == "synth":  # short synthetic formulas: a tiny model learns to read them
        from dataset_tools.synth import SynthConfig, generate
        lines = generate(opts.train + opts.test, seed=7,
                         config=SynthConfig(mean_tokens=16.0, max_tokens=40, max_depth=2))
    else:
        with open(DATA, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    splits = {"train": lines[:opts.train], "test": lines[opts.train:opts.train + opts.test]}
    tok_path = os.path.join(opts.workdir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        train_tokenizer(splits["train"], vocab_size=opts.vocab).save(tok_path)
    datasets = {}
    for name, formulas in splits.items():
        text = os.path.join(opts.workdir, f"{name}.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.writelines(x + "\n" for x in formulas)
        images = os.path.join(opts.workdir, name)
        render_formulas(formulas, images, dpi=(110, 140), seed=0, progress=False)
        ds = Im2LatexDataset.build(images, text, tok_path, batchsize=opts.batch, shuffle=True,
                                   transform="test", keep_smaller_batches=True, max_seq_len=256)
        datasets[name] = ds
    return datasets


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="im2latex", choices=["im2latex", "synth"],
                    help="im2latex validation formulas (real) or dataset_tools.synth formulas")
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="settings/config-tiny.yaml")
    ap.add_argument("--workdir", default="/tmp/pix2tex-precision-check")
    opts = ap.parse_args()
    sys.path.insert(0, REPO)
    os.makedirs(opts.workdir, exist_ok=True)

    import torch
    from pix2tex.config import load_config
    from pix2tex.models import get_model

    torch.set_num_threads(opts.threads)
    data = prepare(opts)
    tok = data["train"].tokenizer
    cfg = load_config(os.path.join(REPO, opts.config),
                      [f"num_tokens={len(tok)}", "max_seq_len=256"])
    torch.manual_seed(0)
    model = get_model(cfg)
    ckpt = os.path.join(opts.workdir, f"model-{opts.source}-{opts.train}-{opts.minutes}.pt")
    losses = []
    if os.path.isfile(ckpt):
        model.load_state_dict(torch.load(ckpt))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=opts.lr)
        model.train()
        t0, epoch = time.time(), 0
        while time.time() - t0 < opts.minutes * 60:
            total = n = 0
            for indices in data["train"].batch_plan(epoch):
                images, tgt = data["train"].load_batch(indices, epoch)
                loss = model(images, tgt)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total, n = total + loss.item(), n + 1
            losses.append(round(total / n, 4))
            log(f"epoch {epoch}: loss {losses[-1]} ({time.time() - t0:.0f} s)")
            epoch += 1
        torch.save(model.state_dict(), ckpt)
    model.eval()

    result = {"benchmark": "inference-precision-agreement", "config": opts.config,
              "source": opts.source,
              "params": sum(p.numel() for p in model.parameters()), "train_formulas": opts.train,
              "test_formulas": opts.test, "train_minutes": opts.minutes, "epoch_losses": losses}
    for split, ds in data.items():
        outputs = {p: [] for p in ("fp32", "bf16", "int8")}
        labels = []
        ds.update(shuffle=False)
        for indices in ds.batch_plan(0):
            images, tgt = ds.load_batch(indices)
            labels += [t[1:].tolist() for t in tgt]
            for p in outputs:
                outputs[p] += [o.tolist() for o in model.generate(images, max_len=255, precision=p)]

        def strip(ids):
            return ids[:ids.index(2) + 1] if 2 in ids else [i for i in ids if i != 0]

        ref = [strip(o) for o in outputs["fp32"]]
        entry = {"images": len(ref),
                 "fp32_exact_match_label": sum(r == strip(lab) for r, lab in zip(ref, labels))}
        for p in ("bf16", "int8"):
            same = [strip(o) == r for o, r in zip(outputs[p], ref)]
            entry[f"{p}_identical_to_fp32"] = sum(same)
            entry[f"{p}_token_agreement"] = round(
                sum(sum(a == b for a, b in zip(strip(o), r)) for o, r in zip(outputs[p], ref))
                / max(1, sum(len(r) for r in ref)), 4)
        result[split] = entry
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
