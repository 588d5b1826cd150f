#!/usr/bin/env python
"""Load test of the HTTP service on loopback: requests/s and latency for concurrent clients.

Starts `python -m pix2tex.serve` (127.0.0.1 only) with the shipped model (models/pix2tex.pth,
or --checkpoint) and sends it `--formulas` held-out im2latex formulas (../shared/data, rendered
here by the project's renderer at 100-130 dpi: pages of mixed sizes, as real traffic has) from
`--clients` concurrent clients (keep-alive connections, POST /predict, the formulas in turn) for
`--seconds`. Reports requests/s, latency percentiles, how the service batched the requests
(images per decoding pass), and the server's resident memory before, during and after the run
(growth means a leak). Prints one JSON object. `--tiny`: a tiny model trained here in ~20-40 s on
8 synthetic formulas instead (the service's own overhead, not a model's).

    .venv/bin/python bench/serve.py [--clients 8] [--seconds 60] [--threads 2] [--backend torch|onnx]
        [--workers N]

`--workers N`: N service processes behind the port (`pix2tex-serve --workers N`, threads / N
torch threads each); the batching figures then add up every worker's /health, and the resident
memory is the whole process tree's.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def tiny_checkpoint(workdir: str, steps: int = 300) -> tuple[str, list[str]]:
    """A tiny ViT model that has memorized 8 rendered synthetic formulas (the recipe of the tests'
    `tiny_model` fixture): greedy outputs of realistic length that end with EOS. Returns the
    checkpoint and the formula images. Cached in `workdir`."""
    import torch

    from dataset_tools.render import render_formulas
    from dataset_tools.synth import SynthConfig, generate
    from pix2tex.config import load_config
    from pix2tex.dataset.dataset import Im2LatexDataset
    from pix2tex.dataset.tokenizer import train_tokenizer
    from pix2tex.train import train

    ckpt = os.path.join(workdir, "run", "last.pth")
    images = os.path.join(workdir, "images")
    if not os.path.isfile(ckpt):
        formulas = generate(48, seed=1, config=SynthConfig(mean_tokens=12.0, max_tokens=30, max_depth=2))
        train_tokenizer(formulas, vocab_size=300).save(os.path.join(workdir, "tokenizer.json"))
        formulas = formulas[:8]
        with open(os.path.join(workdir, "train.txt"), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in formulas))
        render_formulas(formulas, images, dpi=(110, 130), seed=0, progress=False,
                        rejects_path=os.path.join(workdir, "rejects.txt"))
        ds = Im2LatexDataset.build(images, os.path.join(workdir, "train.txt"),
                                   os.path.join(workdir, "tokenizer.json"), batchsize=8)
        ds.save(os.path.join(workdir, "train.pkl"))
        cfg = load_config(None, [
            f"data={workdir}/train.pkl", f"tokenizer={workdir}/tokenizer.json",
            f"model_path={workdir}", "name=run", "encoder_structure=vit", "max_height=64",
            "max_width=256", "dim=64", "encoder_depth=1", "num_layers=2", "heads=4",
            "num_tokens=300", "max_seq_len=64", "batchsize=8", f"max_steps={steps}",
            "epochs=100000", "optimizer.lr=3e-3", "sample_freq=100000", "device=cpu", "seed=0",
            "inference_precision=fp32"])
        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest
        t0 = time.time()
        train(cfg, train_data=Im2LatexDataset.load(os.path.join(workdir, "train.pkl")).update(
            keep_smaller_batches=True))
        log(f"trained the tiny model in {time.time() - t0:.0f} s")
    return ckpt, sorted(os.path.join(images, f) for f in os.listdir(images) if f.endswith(".png"))


def real_images(workdir: str, shared: str, n: int) -> list[str]:
    """The first `n` im2latex validation formulas that render, drawn at 100-130 dpi (cached)."""
    from dataset_tools.render import render_formulas

    source = os.path.join(shared, "im2latex_val.norm.txt")
    if not os.path.isfile(source):
        raise SystemExit(f"error: {source} not found (--shared FOLDER with the corpora, or --tiny)")
    with open(source, encoding="utf-8") as f:
        formulas = [line.strip() for line, _ in zip(f, range(2 * n)) if line.strip()]
    folder = os.path.join(workdir, f"im2latex_val_{n}")
    result = render_formulas(formulas, folder, dpi=(100, 130), seed=0, progress=False)
    return [os.path.join(folder, f"{i:07d}.png") for i in range(len(formulas))
            if i not in result.rejected][:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (the service's workers)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_mib(p)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # a process that ended meanwhile
    return total


def health_of_workers(port: int, workers: int, tries: int = 200) -> dict[int, dict] | None:
    """pid -> /health of each of the service's processes: each request reaches one of them, so ask
    until all have answered (None when some never did)."""
    seen: dict[int, dict] = {}
    for _ in range(tries if workers > 1 else 1):
        health = get(port, "/health")[1]
        seen[health["pid"]] = health
        if len(seen) == workers:
            return seen
    return None


def multipart(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def get(port: int, path: str, timeout: float = 10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def client(port: int, bodies: list, stop_at: float, offset: int, out: list, max_requests: int):
    """One client: keep-alive requests back to back until stop_at (or max_requests)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = offset
    while time.perf_counter() < stop_at and len(out) < max_requests:
        body, headers = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            out.append((time.perf_counter() - t0, resp.status))
        except (OSError, http.client.HTTPException):
            out.append((time.perf_counter() - t0, 0))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.close()


def sample_rss(pid: int, stop_at: float, out: list, every: float = 10.0):
    while time.perf_counter() < stop_at - 1:
        time.sleep(min(every, max(0.0, stop_at - time.perf_counter() - 1)))
        out.append(round(tree_rss_mib(pid), 1))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch/onnxruntime threads")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1,
                    help="service processes behind the port (--threads are shared among them)")
    ap.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--static-batching", action="store_true",
                    help="the service decodes each queued batch to its end (no continuous batching)")
    ap.add_argument("--checkpoint", default=os.path.join(REPO, "models", "pix2tex.pth"),
                    help="serve this model (default: the shipped one)")
    ap.add_argument("--images", nargs="*", help="images to send (default: --formulas rendered "
                    "im2latex val formulas; with --tiny the tiny model's)")
    ap.add_argument("--formulas", type=int, default=16, help="rendered formulas to send")
    ap.add_argument("--shared", default=os.path.join(REPO, "..", "shared", "data"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model trained here instead")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pix2tex-bench-serve"))
    opts = ap.parse_args()
    os.makedirs(opts.workdir, exist_ok=True)

    if opts.tiny:
        ckpt, images = tiny_checkpoint(opts.workdir)
    else:
        ckpt, images = opts.checkpoint, opts.images or real_images(opts.workdir, opts.shared, opts.formulas)
    images = opts.images or images
    if opts.backend == "onnx":
        onnx_dir = os.path.join(opts.workdir, "onnx")
        if not os.path.isfile(os.path.join(onnx_dir, "pix2tex_onnx.json")):
            subprocess.run([sys.executable, "-m", "pix2tex.export", "--onnx", "--checkpoint", ckpt,
                            "--out", onnx_dir], check=True, cwd=REPO, stdout=sys.stderr)
        ckpt = onnx_dir
    bodies = []
    for path in images:
        with open(path, "rb") as f:
            bodies.append(multipart(os.path.basename(path), f.read()))

    port = free_port()
    server_log = os.path.join(opts.workdir, "server.log")
    threads = max(1, opts.threads // opts.workers)  # per process: processes x threads <= --threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen([sys.executable, "-m", "pix2tex.serve", "--checkpoint", ckpt,
                               "--backend", opts.backend, "--host", "127.0.0.1", "--port", str(port),
                               "--threads", str(threads), "--max-batch", str(opts.max_batch),
                               "--workers", str(opts.workers),
                               "--queue-size", str(max(64, 4 * opts.clients)),
                               *(["--static-batching"] if opts.static_batching else [])],
                              cwd=REPO, env=env, stderr=open(server_log, "w"))
    try:
        for _ in range(600):
            if server.poll() is not None:
                with open(server_log) as f:
                    raise RuntimeError(f"the server exited: {f.read()}")
            try:
                if get(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the server did not answer /health within 120 s")
        # warm-up: concurrent connections, so that every worker has read every page size
        warm = [[] for _ in range(opts.clients)]
        warmers = [threading.Thread(target=client, args=(port, bodies, time.perf_counter() + 60, i,
                                                         warm[i], 2 * len(bodies)))
                   for i in range(opts.clients)]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        time.sleep(0.5)
        rss_before = tree_rss_mib(server.pid)
        health_before = health_of_workers(port, opts.workers)

        results = [[] for _ in range(opts.clients)]
        stop_at = time.perf_counter() + opts.seconds
        threads = [threading.Thread(target=client, args=(port, bodies, stop_at, i, results[i], 10**7))
                   for i in range(opts.clients)]
        samples = []  # server RSS every ~10 s: a leak keeps climbing, warm-up levels off
        sampler = threading.Thread(target=sample_rss, args=(server.pid, stop_at, samples), daemon=True)
        t0 = time.perf_counter()
        for t in threads + [sampler]:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        time.sleep(0.5)
        rss_after = tree_rss_mib(server.pid)
        health_after = health_of_workers(port, opts.workers)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    done = [r for rs in results for r in rs]
    ok = [lat for lat, status in done if status == 200]
    batching = None
    if health_before and health_after and set(health_before) == set(health_after):
        def grew(key):  # summed over the workers
            return sum(health_after[p].get(key, 0) - health_before[p].get(key, 0) for p in health_after)
        pages, batches, passes = grew("pages"), grew("batches"), grew("forward_passes")
        steps, row_steps = grew("decode_steps"), grew("row_steps")
        # queue batches: what the inference thread took at once; forward passes: decoding passes
        # (continuous batching: encoder passes of the pages that joined the running decode, and
        # images per decoding step: how many formulas each step carried on average)
        batching = {"images": pages, "queue_batches": batches, "forward_passes": passes,
                    "images_per_queue_batch": round(pages / max(batches, 1), 2),
                    "images_per_forward_pass": round(pages / max(passes, 1), 2),
                    "continuous": all(h.get("continuous_batching") for h in health_after.values()),
                    "images_per_decoding_step": round(row_steps / steps, 2) if steps else None,
                    "max_batch": opts.max_batch}
    print(json.dumps({
        "bench": "serve",
        "backend": opts.backend,
        "clients": opts.clients,
        "seconds": round(elapsed, 1),
        "server_threads": opts.threads,
        "workers": opts.workers,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "requests": len(done),
        "errors": len(done) - len(ok),
        "requests_per_s": round(len(ok) / elapsed, 2),
        "latency_ms": {"p50": round(1000 * percentile(ok, 50), 1),
                       "p90": round(1000 * percentile(ok, 90), 1),
                       "p99": round(1000 * percentile(ok, 99), 1),
                       "mean": round(1000 * statistics.fmean(ok), 1),
                       "max": round(1000 * max(ok), 1)} if ok else None,
        "batching": batching,  # None: a worker never answered /health
        "rss_mib": {"before": round(rss_before, 1), "during": samples, "after": round(rss_after, 1),
                    "growth": round(rss_after - rss_before, 1),
                    "growth_second_half": round(rss_after - samples[len(samples) // 2], 1)
                    if samples else None},
        "model": {"checkpoint": ckpt, "images": len(images)},
    }, indent=1))


if __name__ == "__main__":
    main()
