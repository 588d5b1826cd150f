#!/usr/bin/env python
"""Generation speed on CPU: this project's model beside LaTeX-OCR 0.1.4's, in one run.

Both sides build the architecture of their default config with random weights (ours:
settings/config.yaml) and decode one 192x512 image (batch 1, and batch 16 of it) for exactly
--tokens tokens: EOS is disabled (ours: min_len = max_len, greedy; the peer: its own uncached
`generate` with eos_token=None, which samples — the choice of token does not change the work per
step). Also batch 1 for --long-tokens tokens, where the peer's cost per step grows with the prefix
(no KV cache) and ours does not.

Reported per case: encoder ms, decode ms and ms per token (and per step, first and last 10),
total, RSS (each case in its own process). Ours runs in the model's inference precision
(--precision, default auto: on this AMX CPU int8 decoder linears with a bf16 encoder and caches)
and, for comparison, float32. The decode step is set against its floor: bytes the step must read
(decoder weights, plus the KV caches) / memory read bandwidth measured in this run.

Both sides use --threads intra-op threads. On a machine shared with other processes, two threads
make every small op of a decode step wait at an OpenMP barrier for a core someone else holds:
use --threads 1 there (steadier for both sides; compare the ratios within one run).

    .venv/bin/python bench/generate.py [--threads 2] [--tokens 100] [--long-tokens 300] [--no-peer]

Prints one JSON object. The peer runs from $PEER_VENV (default ~/.cache/peer-pix2tex, built by
../shared/peer/setup_venv.sh); without it "peer" is null with a message.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VENV = os.environ.get("PEER_VENV", os.path.expanduser("~/.cache/peer-pix2tex"))
PEER_BENCH = os.path.join(os.path.dirname(REPO), "shared", "peer", "bench_pix2tex.py")
HEIGHT, WIDTH = 192, 512


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- one case, in its own process ---------------------------------------------------------------

def rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0


def run_case(opts) -> dict:
    import torch
    sys.path.insert(0, REPO)
    from pix2tex.config import load_config
    from pix2tex.models import get_model
    from pix2tex.models.model import encoder_dtype, resolve_precision

    rss_import = rss_now_mib()
    torch.set_num_threads(opts.threads)
    cfg = load_config(os.path.join(REPO, opts.config), [f"compile={opts.compile}"])
    torch.manual_seed(0)
    model = get_model(cfg).eval()
    rss_built = rss_now_mib()
    images = torch.randn(opts.batch, 1, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    precision = resolve_precision(opts.precision, images.device)

    # time each decoder step (the peer's bench times its steps the same way)
    step_times = []
    start = model.decoder.start

    def timed_start(*args, **kwargs):
        state = start(*args, **kwargs)
        step = state.step

        def timed_step(tokens):
            t = time.perf_counter()
            logits = step(tokens)
            step_times.append(time.perf_counter() - t)
            return logits
        state.step = timed_step
        return state
    model.decoder.start = timed_start

    def once(tokens):
        step_times.clear()
        t0 = time.perf_counter()
        memory = model.encode_for_inference(images, precision)
        t1 = time.perf_counter()
        out = model.generate(memory=memory, max_len=tokens, min_len=tokens, precision=precision)
        t2 = time.perf_counter()
        assert out.shape == (opts.batch, tokens), out.shape
        return t1 - t0, t2 - t1

    for _ in range(opts.warmup):
        once(10)
    encs, decs, first10, last10 = [], [], [], []
    for r in range(opts.reps):
        e, d = once(opts.tokens)
        encs.append(e)
        decs.append(d)
        first10.append(statistics.mean(step_times[:10]))
        last10.append(statistics.mean(step_times[-10:]))
        log(f"  ours b{opts.batch} {opts.precision}: encoder {e * 1e3:.1f} ms, "
            f"decode {opts.tokens} tok {d * 1e3:.1f} ms")
    e, d = statistics.median(encs), statistics.median(decs)
    return {
        "batch": opts.batch, "image_hw": [HEIGHT, WIDTH], "tokens": opts.tokens,
        "precision": precision, "reps": opts.reps,
        "encoder_ms": round(e * 1e3, 2), "decode_ms": round(d * 1e3, 2),
        "total_ms": round((e + d) * 1e3, 2),
        "ms_per_token_decode": round(d * 1e3 / opts.tokens, 3),
        "ms_per_step_first10": round(statistics.median(first10) * 1e3, 3),
        "ms_per_step_last10": round(statistics.median(last10) * 1e3, 3),
        "tokens_per_s_all_sequences": round(opts.batch * opts.tokens / (e + d), 1),
        "all_total_ms": [round((a + b) * 1e3, 1) for a, b in zip(encs, decs)],
        "rss_after_imports_mib": round(rss_import, 1),  # torch (a CUDA build here), timm, ...
        "rss_after_build_mib": round(rss_built, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "params": {"total": count(model), "encoder": count(model.encoder),
                   "decoder": count(model.decoder)},
        "step_bytes": step_bytes(model.decoder._weights("fp32"), precision,
                                 encoder_dtype(precision).itemsize, opts.batch, opts.tokens),
    }


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_bytes(weights: dict, precision: str, cache_size: int, batch: int, tokens: int) -> dict:
    """Bytes one decode step reads: the decoder weights it multiplies by (one row of the token and
    position tables; not the cross-attention key/value projections, which run once per image) and
    the KV caches (cross: the encoder grid; self: the prefix, averaged over the tokens).
    `weights` is the float32 layout; int8 counts a byte per weight (its scales are negligible);
    cache_size: bytes per KV-cache element."""
    weight_size = {"fp32": 4, "bf16": 2, "int8": 1}[precision]

    def numel(*tensors):
        return sum(t.numel() for t in tensors if t is not None)

    n = 2 * weights["tok"].shape[1] + numel(weights["final_gamma"], weights["w_logits"],
                                            weights["b_logits"])
    cross = self_kv = 0
    cells = (HEIGHT // 16) * (WIDTH // 16) + 1
    per_step = ("gamma", "w_qkv", "w_q", "w_out", "w_in", "b_in", "w_ff_out", "b_ff_out")
    for blk in weights["blocks"]:
        n += numel(*(blk.get(k) for k in per_step))
        if blk["kind"] == "c":
            cross += 2 * batch * cells * blk["w_q"].shape[0]
        elif blk["kind"] == "a":
            self_kv += 2 * batch * (tokens / 2) * blk["w_qkv"].shape[0] // 3
    return {"weights": int(n * weight_size), "cross_kv": int(cross * cache_size),
            "self_kv_mean": int(self_kv * cache_size)}


def run_bandwidth(opts) -> dict:
    """Read bandwidth of a buffer far larger than the caches (sum of 1 GiB of float32)."""
    import torch
    torch.set_num_threads(opts.threads)
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = min(timed(lambda: x.sum()) for _ in range(5))
    return {"read_GBps": round(x.numel() * 4 / best / 1e9, 2), "buffer_GiB": 1.0}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- driver ------------------------------------------------------------------------------------

def subprocess_json(cmd, env=None, cwd=None) -> dict:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {' '.join(cmd)}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def ours(opts, batch, tokens, precision) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", "--batch", str(batch),
           "--tokens", str(tokens), "--precision", precision, "--threads", str(opts.threads),
           "--reps", str(opts.reps if batch == 1 else opts.reps_b16), "--config", opts.config,
           "--warmup", str(opts.warmup)] + (["--compile"] if opts.compile else [])
    log(f"[ours batch {batch}, {tokens} tokens, {precision}]")
    return subprocess_json(cmd)


def peer(opts, phase, tokens) -> dict:
    python = os.path.join(PEER_VENV, "bin", "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    cmd = [python, PEER_BENCH, "--phase", phase, "--threads", str(opts.threads),
           "--tokens", str(tokens), "--height", str(HEIGHT), "--width", str(WIDTH),
           "--reps-b1", str(opts.peer_reps), "--reps-b16", "1"]
    log(f"[peer {phase}, {tokens} tokens]")
    # run outside the repo so that `import pix2tex` is the peer's package, not ours
    return subprocess_json(cmd, env=env, cwd=os.path.dirname(PEER_BENCH))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--long-tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reps-b16", type=int, default=2)
    ap.add_argument("--peer-reps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="auto", help="auto | bf16 | fp32 | int8")
    ap.add_argument("--config", default="settings/config.yaml")
    ap.add_argument("--compile", action="store_true", help="torch.compile the inference encoder")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-fp32", action="store_true", help="skip the float32 comparison runs")
    ap.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.case:
        print(json.dumps(run_case(opts)), flush=True)
        return
    if opts.bandwidth:
        print(json.dumps(run_bandwidth(opts)), flush=True)
        return

    t0 = time.time()
    result = {"benchmark": "generate-cpu-random-init", "config": opts.config,
              "threads": opts.threads, "image_hw": [HEIGHT, WIDTH], "nproc": os.cpu_count(),
              "loadavg_start": list(os.getloadavg()),
              "note": "forced token counts (no EOS); ours greedy with KV cache, peer samples "
                      "without a cache; random weights; ratios = peer / ours"}
    result["bandwidth"] = subprocess_json([sys.executable, os.path.abspath(__file__), "--bandwidth",
                                           "--threads", str(opts.threads)])
    cases = {"b1": (1, opts.tokens), "b16": (16, opts.tokens), "b1_long": (1, opts.long_tokens)}
    result["ours"] = {name: ours(opts, b, n, opts.precision) for name, (b, n) in cases.items()}
    result["ours_params"] = result["ours"]["b1"].get("params")
    if not opts.no_fp32:
        result["ours_fp32"] = {name: ours(opts, b, n, "fp32") for name, (b, n) in cases.items()}
    if opts.no_peer:
        result["peer"] = None
    elif not (os.path.isfile(os.path.join(PEER_VENV, "bin", "python"))
              and os.path.isfile(PEER_BENCH)):
        result["peer"] = None
        result["peer_message"] = (f"peer venv {PEER_VENV} or {PEER_BENCH} missing: build it with "
                                  f"bash ../shared/peer/setup_venv.sh (or set PEER_VENV)")
    else:
        result["peer"] = {
            "params": peer(opts, "params", opts.tokens),
            "b1": peer(opts, "infer1", opts.tokens).get("infer_b1"),
            "b16": peer(opts, "infer16", opts.tokens).get("infer_b16"),
            "b1_long": peer(opts, "infer1", opts.long_tokens).get("infer_b1"),
        }
        ratios = {}
        for name in cases:
            p, o = result["peer"].get(name), result["ours"].get(name)
            if p and o and "total_ms" in p and "total_ms" in o:
                ratios[name] = {"total": round(p["total_ms"] / o["total_ms"], 2),
                                "encoder": round(p["encoder_ms"] / o["encoder_ms"], 2),
                                "decode": round(p["decode_ms"] / o["decode_ms"], 2)}
                of = result.get("ours_fp32", {}).get(name)
                if of and "total_ms" in of:
                    ratios[name]["total_vs_our_fp32"] = round(p["total_ms"] / of["total_ms"], 2)
        result["speedup_peer_over_ours"] = ratios
    bw = result["bandwidth"].get("read_GBps")
    floors = {}
    for name, case in result["ours"].items():
        if bw and "step_bytes" in case:
            sb = case["step_bytes"]
            w_ms = sb["weights"] / (bw * 1e9) * 1e3
            all_ms = (sb["weights"] + sb["cross_kv"] + sb["self_kv_mean"]) / (bw * 1e9) * 1e3
            floors[name] = {"floor_ms_weights": round(w_ms, 3),
                            "floor_ms_weights_and_kv": round(all_ms, 3),
                            "measured_ms_per_step": case["ms_per_token_decode"],
                            "measured_over_floor": round(case["ms_per_token_decode"] / all_ms, 2)}
    result["decode_step_floor"] = floors
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
