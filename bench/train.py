#!/usr/bin/env python
"""Training speed on CPU: this project's training step beside LaTeX-OCR 0.1.4's, in one run.

Both sides train the architecture of their default config (ours: settings/config.yaml, the peer's:
its packaged config.yaml) on the same kind of input as ../shared/peer/bench_pix2tex.py: batch 16,
random images cycling 64x256 ... 192x512, random 60-token targets, with forward + backward + clip +
optimizer + LR-schedule step. Ours runs `pix2tex.train.forward_backward` / `optimizer_step`, the
functions of the real loop, in float32 and in bf16 autocast (and with `--compile`, torch.compile).

Also reported: model FLOPs per sample (torch's FlopCounterMode, forward + backward) and the model
FLOPs utilization against a bf16 / fp32 1024x1024 matmul measured in this run; optionally
(`--learning`) a bf16-vs-fp32 check: the same small model trained on the same real rendered formulas
in both precisions, comparing validation loss curves.

Each measurement runs in its own subprocess (peak RSS is per measurement). Prints one JSON object.

    .venv/bin/python bench/train.py [--threads 2] [--steps 10] [--warmup 5] [--learning] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(64, 256), (96, 320), (128, 384), (160, 448), (192, 512)]  # (height, width), as the peer
PEER_VENV = os.environ.get("PEER_VENV", os.path.expanduser("~/.cache/peer-pix2tex"))
PEER_BENCH = os.path.join(os.path.dirname(REPO), "shared", "peer", "bench_pix2tex.py")
# 1024x1024 matmul FLOP/s on 2 threads of an idle machine of this kind (../shared/peer/README.md)
REFERENCE_PEAK = {"bf16": 1.1e12, "fp32": 2.8e11}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- measurements (each in its own process) ----------------------------------------------------

def build(opts, precision: str):
    import torch

    from pix2tex.config import load_config
    from pix2tex.models import get_model
    from pix2tex.train import build_optimizer, build_scheduler, setup_runtime

    torch.set_num_threads(opts.threads)
    cfg = load_config(os.path.join(REPO, opts.config),
                      ["device=cpu", f"precision={precision}", f"batchsize={opts.batch}"])
    rt = setup_runtime(cfg)
    torch.manual_seed(0)
    model = get_model(cfg).to(rt.device)
    model.train()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, 10**6)
    return torch, cfg, rt, model, optimizer, scheduler


def random_batch(torch, cfg, g, batch: int, seq_len: int, h: int, w: int):
    images = torch.randn(batch, cfg.channels, h, w, generator=g)
    tgt = torch.randint(3, cfg.num_tokens, (batch, seq_len), generator=g)
    tgt[:, 0], tgt[:, -1] = cfg.bos_token, cfg.eos_token
    return images, tgt


def phase_ours(opts, precision: str, compiled: bool = False) -> dict:
    from pix2tex.train import default_loss, forward_backward, optimizer_step, target_tokens

    torch, cfg, rt, model, optimizer, scheduler = build(opts, precision)
    stepped = torch.compile(model) if compiled else model  # as train() does with compile: true
    label = precision + (" compiled" if compiled else "")
    g = torch.Generator().manual_seed(2)

    def step(h, w):
        images, tgt = random_batch(torch, cfg, g, opts.batch, opts.seq_len, h, w)
        t = time.perf_counter()
        tokens = target_tokens(tgt, cfg.pad_token)
        loss_sum, _ = forward_backward(stepped, default_loss, images, tgt, micro=opts.batch,
                                       weight=1.0 / tokens, rt=rt, pad=cfg.pad_token)
        optimizer_step(model, optimizer, scheduler, cfg.grad_clip)
        return time.perf_counter() - t, loss_sum / tokens

    for i in range(opts.warmup):
        h, w = SIZES[i % len(SIZES)]
        dt, loss = step(h, w)
        log(f"  ours {label} warmup {h}x{w}: {dt:.2f} s loss {loss:.3f}")
    times, losses, by_size = [], [], {}
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(opts.steps):
        h, w = SIZES[i % len(SIZES)]
        dt, loss = step(h, w)
        times.append(dt)
        losses.append(loss)
        by_size.setdefault(f"{h}x{w}", []).append(dt)
        log(f"  ours {label} step {i} {h}x{w}: {dt:.2f} s loss {loss:.3f}")
    cpu = (time.process_time() - c0) / (time.perf_counter() - w0)
    return {"precision": precision, "compile": compiled, "batch": opts.batch,
            "seq_len": opts.seq_len, "steps_timed": len(times), "warmup_steps": opts.warmup,
            "optimizer": cfg.optimizer.name, "scheduler": cfg.scheduler.name,
            "samples_per_s": round(opts.batch * len(times) / sum(times), 3),
            "mean_step_s": round(sum(times) / len(times), 3),
            "samples_per_s_by_size": {k: round(opts.batch * len(v) / sum(v), 3) for k, v in by_size.items()},
            "step_s_all": [round(t, 3) for t in times],
            "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
            "cpu_util_cores": round(cpu, 2),
            "params": sum(p.numel() for p in model.parameters()),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def phase_flops(opts) -> dict:
    """Model FLOPs of forward + backward per sample at each image size, and the matmul peaks."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pix2tex.train import default_loss

    torch, cfg, rt, model, _, _ = build(opts, "fp32")
    g = torch.Generator().manual_seed(2)
    per_sample = {}
    for h, w in SIZES:
        images, tgt = random_batch(torch, cfg, g, 2, opts.seq_len, h, w)
        with FlopCounterMode(display=False) as counter:
            default_loss(model, images, tgt).backward()
        model.zero_grad(set_to_none=True)
        per_sample[f"{h}x{w}"] = counter.get_total_flops() / 2

    def matmul_peak(dtype) -> dict:
        """Best of 5 runs of 10 matmuls 1024x1024: FLOP per wall-second and per CPU-second."""
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        for _ in range(5):
            a @ b
        wall = cpu = float("inf")
        for _ in range(5):
            t, c = time.perf_counter(), time.process_time()
            for _ in range(10):
                a @ b
            wall = min(wall, (time.perf_counter() - t) / 10)
            cpu = min(cpu, (time.process_time() - c) / 10)
        return {"wall": 2 * 1024 ** 3 / wall, "cpu": 2 * 1024 ** 3 / cpu}

    return {"flops_per_sample_fwd_bwd": per_sample,
            "matmul_peak_flops": {"bf16": matmul_peak(torch.bfloat16),
                                  "fp32": matmul_peak(torch.float32)}}


def phase_learning(opts) -> dict:
    """bf16 vs fp32 on real rendered formulas: the same small model, data and seed, both precisions."""
    import torch

    from pix2tex.config import load_config
    from pix2tex.train import train

    torch.set_num_threads(opts.threads)
    data = learning_data(opts)
    out = {"dataset": data["summary"]}
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(os.path.join(REPO, opts.learning_config), [
                f"data={data['train']}", f"valdata={data['val']}", f"tokenizer={data['tokenizer']}",
                "device=cpu", f"precision={precision}", f"model_path={tmp}", "name=learn",
                f"max_steps={opts.learning_steps}", f"sample_freq={opts.learning_steps // 4}",
                "valbatches=8", "testbatchsize=16", "batchsize=16", "log_freq=5", "epochs=1000"])
            t = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - t
            records = [json.loads(line) for line in open(os.path.join(tmp, "learn", "metrics.jsonl"))]
        train_loss = [r["loss"] for r in records if "loss" in r]
        val = [{"step": r["step"], **{k: round(r["val"][k], 4) for k in
                                      ("val_loss", "bleu", "edit_distance", "token_accuracy")}}
               for r in records if "val" in r]
        out[precision] = {"seconds": round(seconds, 1), "val": val,
                          "train_loss_first_last_5": [round(sum(train_loss[:5]) / 5, 4),
                                                      round(sum(train_loss[-5:]) / 5, 4)]}
        log(f"  learning {precision}: {out[precision]}")
    return out


def learning_data(opts) -> dict:
    """Render (once, cached under --cache) real im2latex formulas and build train/val pkls."""
    from dataset_tools.render import render_formulas
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import train_tokenizer

    root = os.path.join(opts.cache, f"learning-{opts.learning_samples}")
    paths = {"train": os.path.join(root, "train.pkl"), "val": os.path.join(root, "val.pkl"),
             "tokenizer": os.path.join(root, "tokenizer.json")}
    source = os.path.join(os.path.dirname(REPO), "shared", "data", "im2latex_val.norm.txt")
    if not all(os.path.isfile(p) for p in paths.values()):
        with open(source, encoding="utf-8") as f:
            lines = [" ".join(l.split()) for l in f if 0 < len(l.split()) <= 40]
        lines = lines[:opts.learning_samples]
        n_val = max(64, len(lines) // 10)
        splits = {"train": lines[n_val:], "val": lines[:n_val]}
        os.makedirs(root, exist_ok=True)
        tok = train_tokenizer(splits["train"], vocab_size=1000)
        tok.save(paths["tokenizer"])
        for name, formulas in splits.items():
            txt = os.path.join(root, f"{name}.txt")
            with open(txt, "w", encoding="utf-8") as f:
                f.write("".join(x + "\n" for x in formulas))
            render_formulas(formulas, os.path.join(root, "images", name), progress=False)
            ds = Im2LatexDataset.build(os.path.join(root, "images", name), txt, paths["tokenizer"])
            ds.save(paths[name])
    from pix2tex.dataset.dataset import Im2LatexDataset as D
    paths["summary"] = {k: len(D.load(paths[k]).indices) for k in ("train", "val")}
    paths["summary"]["source"] = "im2latex_val.norm.txt (formulas of <= 40 tokens)"
    return paths


def phase_peer(opts) -> dict:
    """LaTeX-OCR 0.1.4's own training step (../shared/peer/bench_pix2tex.py --phase train)."""
    python = os.path.join(PEER_VENV, "bin", "python")
    if not os.path.isfile(python):
        return {"error": f"peer venv not found at {PEER_VENV} (bash ../shared/peer/setup_venv.sh)"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    # Run outside the repo: from inside it, `import pix2tex` would find this project's package.
    p = subprocess.run([python, PEER_BENCH, "--phase", "train", "--threads", str(opts.threads),
                        "--train-steps", str(opts.steps), "--warmup-train", str(opts.warmup),
                        "--train-batch", str(opts.batch), "--seq-len", str(opts.seq_len)],
                       cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        return {"error": f"peer bench exited {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])["train_b16"]


# --- driver ----------------------------------------------------------------------------------

def sub(opts, phase: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase] + opts.passthrough
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    if p.returncode:
        return {"error": f"phase {phase} exited {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(result: dict, opts) -> None:
    """Add model FLOP rates, MFU and the ratios to the peer to `result` (in place)."""
    peer_run = result.get("peer_latex_ocr_0.1.4", {})
    peer = peer_run.get("samples_per_s")
    fl = result["flops"]
    if "error" not in fl:
        per = fl["flops_per_sample_fwd_bwd"]
        peaks = fl.pop("matmul_peak_flops")
        for name in ("fp32", "bf16", "bf16_compile"):
            r = result.get(name, {"error": "not run"})
            if "error" in r:
                continue
            peak = peaks["fp32" if r["precision"] == "fp32" else "bf16"]
            # model FLOPs of the timed steps (sizes cycled in order) over their time
            flops = sum(opts.batch * per[f"{h}x{w}"] for h, w in
                        (SIZES[i % len(SIZES)] for i in range(len(r["step_s_all"]))))
            wall = flops / sum(r["step_s_all"])
            r["achieved_gflop_s"] = round(wall / 1e9, 1)
            r["mfu_vs_measured_peak"] = round(wall / peak["wall"], 3)
            # per CPU-second on both sides: what other processes on a shared machine take away
            # from the step and from the matmul alike cancels out
            r["mfu_per_cpu_s"] = round(wall / max(r["cpu_util_cores"], 1e-9) / peak["cpu"], 3)
            r["mfu_vs_readme_peak"] = round(wall / (REFERENCE_PEAK[r["precision"]] * opts.threads / 2), 3)
            if peer:
                r["ratio_vs_peer"] = round(r["samples_per_s"] / peer, 2)
                peer_cpu = peer / max(peer_run["cpu_util_cores"], 1e-9)
                r["ratio_vs_peer_per_cpu_s"] = round(
                    r["samples_per_s"] / max(r["cpu_util_cores"], 1e-9) / peer_cpu, 2)
        fl["matmul_peak_gflop_s"] = {k: {kk: round(vv / 1e9, 1) for kk, vv in v.items()}
                                     for k, v in peaks.items()}
        fl["flops_per_sample_fwd_bwd"] = {k: round(v / 1e9, 2) for k, v in per.items()}
        fl["unit"] = "GFLOP per sample (forward + backward)"
    best = max((result[n] for n in ("fp32", "bf16", "bf16_compile") if "samples_per_s" in result.get(n, {})),
               key=lambda r: r["samples_per_s"], default=None)
    if best and peer:
        result["best"] = {k: best.get(k) for k in (
            "precision", "compile", "samples_per_s", "ratio_vs_peer", "ratio_vs_peer_per_cpu_s",
            "mfu_vs_measured_peak", "mfu_per_cpu_s", "mfu_vs_readme_peak", "peak_rss_mib")}
        result["best"]["peer_samples_per_s"] = peer
        result["best"]["peer_peak_rss_mib"] = peer_run.get("peak_rss_mib")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", default="all")
    ap.add_argument("--config", default="settings/config.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=60)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time bf16 with torch.compile")
    ap.add_argument("--learning", action="store_true", help="also run the bf16-vs-fp32 learning check")
    ap.add_argument("--learning-config", default="settings/config-tiny.yaml")
    ap.add_argument("--learning-samples", type=int, default=2000)
    ap.add_argument("--learning-steps", type=int, default=200)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pix2tex-bench"),
                    help="where the learning check's rendered dataset is kept between runs")
    opts = ap.parse_args()
    opts.passthrough = [a for a in sys.argv[1:] if not a.startswith("--phase")]
    phases = {"fp32": lambda: phase_ours(opts, "fp32"),
              "bf16": lambda: phase_ours(opts, "bf16"),
              "bf16_compile": lambda: phase_ours(opts, "bf16", compiled=True),
              "flops": lambda: phase_flops(opts), "learning": lambda: phase_learning(opts),
              "peer": lambda: phase_peer(opts)}
    if opts.phase != "all":
        print(json.dumps(phases[opts.phase]()), flush=True)
        return

    result = {"benchmark": "train-step-cpu", "config": opts.config, "threads": opts.threads,
              "batch": opts.batch, "seq_len": opts.seq_len, "image_sizes": [f"{h}x{w}" for h, w in SIZES],
              "loadavg_start": list(os.getloadavg())}
    t0 = time.time()
    order = ["peer", "fp32", "bf16"] + (["bf16_compile"] if opts.compile else []) + ["flops"] + \
        (["learning"] if opts.learning else [])
    for name in order:
        if name == "peer" and opts.no_peer:
            continue
        log(f"[{name}]")
        result[name if name != "peer" else "peer_latex_ocr_0.1.4"] = (
            phase_peer(opts) if name == "peer" else sub(opts, name))
    summarize(result, opts)
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
