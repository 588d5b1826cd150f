"""HTTP service: FastAPI + uvicorn around one `LatexOCR` loaded once.

    pix2tex-serve --checkpoint checkpoints/pix2tex/best.pth --port 8502

    POST /predict        multipart field `file`   -> {"latex", "confidence", "seconds"}
    POST /predict/batch  multipart fields `files` -> {"results": [{"file", "latex", "confidence",
                                                                   "seconds"} |
                                                                   {"file", "error", "status"}]}
    GET  /health         -> {"status": "ok", ...}
    GET  /               a page: drop, paste or pick an image; see, copy and render the LaTeX

Requests are decoded and preprocessed on a small thread pool, then wait in one bounded queue for
the inference thread, which takes whatever is waiting (up to `max_batch`) and runs it together:
concurrent requests share one decoding pass whatever their page sizes (`LatexOCR.recognize`: each
size encoded on its own, the padding masked, so a result never depends on the other requests). Limits, each
answered with a message: body larger than `max_upload_bytes` -> 413, image over `max_pixels` ->
413, not an image -> 422, queue full -> 503, no answer within `timeout` seconds -> 504, a formula
without its end within `max_tokens` tokens (None: the model's maximum length) -> 422 (a cut
formula is not returned as if it were the answer). The timeout bounds a running decode too: the
decoding loop asks once per step whether every request of its batch has timed out (or the batch's
latest deadline has passed) and then stops (pix2tex.cancel), so the inference thread goes on with
the next batch within a step instead of decoding a runaway formula to its end. A failed request
never stops the service.

With the torch backend's greedy decoding (a .pth model, no --beam/--verify) the batching is
continuous instead: pages join the running decode between two steps and each leaves at its own
end (`LatexOCR.stream`), so no request waits for a longer batch-mate or for a batch to finish;
/health counts its decoding steps and the pages they carried (`row_steps`).

Scaling out: `--workers N` runs N service processes behind one port (uvicorn's workers; the kernel
hands each new connection to one of them), each with its own model and cores // N threads.
"""
from __future__ import annotations

from pix2tex.extras import require

require("serve", __name__)  # first: without the serve extra, say what to install

import argparse
import asyncio
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from fastapi import FastAPI, File, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pix2tex.cancel import DecodeCancelled
from pix2tex.predict import Reading
from pix2tex.preprocess import ImageError, ImageTooLarge

STATIC_DIR = Path(__file__).resolve().parent / "static"


@dataclass
class Limits:
    max_upload_bytes: int = 10 * 2**20  # one request body (all files of a batch together)
    max_pixels: int = 25_000_000  # per image, checked from the header before decoding
    max_files: int = 16  # per /predict/batch request
    timeout: float = 30.0  # seconds from arrival to answer, a running decode included
    max_tokens: int | None = None  # per formula, unended within them -> 422 (None: the model's max)
    queue_size: int = 64  # pages waiting for the model; more -> 503
    max_batch: int = 8  # pages per forward pass
    batch_wait: float = 0.002  # seconds the inference thread waits for company after the first page
    preprocess_threads: int = 2  # concurrent decodes (bounds the memory of big images)
    continuous: bool = True  # continuous batching where the model can (else each batch to its end)


class QueueFull(RuntimeError):
    pass


class TooManyTokens(ValueError):
    """A formula that did not end within the token limit: its text is cut, so it is no answer."""

    def __init__(self, limit: int | None):
        where = f"the limit of {limit} tokens" if limit else "the model's maximum length"
        super().__init__(f"the formula did not end within {where}")


class Job(NamedTuple):
    page: object  # a preprocessed page (uint8 HxW)
    fut: asyncio.Future  # the waiting request's; set from the inference thread via `loop`
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which nobody waits for the result
    crop: object = None  # with --verify: the image's ink at its own scale (LatexOCR.read's crops)


class InferenceQueue:
    """A bounded queue in front of one inference thread that batches what is waiting."""

    def __init__(self, model, limits: Limits):
        self.model, self.limits = model, limits
        self.q: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.thread = threading.Thread(target=self._run, name="pix2tex-inference", daemon=True)
        self.batches = self.pages = self.forward_passes = 0
        self.cancelled = 0  # batches whose decode was stopped because nobody waited any more
        # continuous batching where the model can (torch, greedy): pages join the running decode
        self.streams = limits.continuous and getattr(model, "can_stream", False)
        self.decode_steps = self.row_steps = 0

    def start(self):
        self.thread.start()

    def stop(self):
        self.q.put(None)  # may block briefly if full: the worker drains it
        self.thread.join(timeout=30)

    def submit(self, page, deadline: float, crop=None) -> asyncio.Future:
        """Queue `page` (and its image's `crop`, for verification) for a request that waits until
        `deadline` (time.monotonic())."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        try:
            self.q.put_nowait(Job(page, fut, loop, deadline, crop))
        except queue.Full:
            raise QueueFull(f"the model is busy ({self.limits.queue_size} images waiting); retry shortly") from None
        return fut

    def _run(self):
        if self.streams:
            return self._run_stream()
        stopping = False
        while not stopping:
            items, stopping = self._take(wait=True, room=self.limits.max_batch)
            items = _still_wanted(items)
            if not items:
                continue
            passes = self.model.decode_batches
            try:
                readings = self.model.read([it.page for it in items], crops=[it.crop for it in items],
                                           max_len=self.limits.max_tokens,
                                           should_stop=_nobody_waits(items))
                results = [(r, None) if r.complete else (None, TooManyTokens(self.limits.max_tokens))
                           for r in readings]
            except DecodeCancelled as e:
                self.cancelled += 1
                results = [(None, e)] * len(items)
            except Exception as e:  # report to each request; keep serving
                results = [(None, e)] * len(items)
            self.batches += 1
            self.pages += len(items)
            self.forward_passes += self.model.decode_batches - passes
            for it, (text, err) in zip(items, results):
                it.loop.call_soon_threadsafe(_settle, it.fut, text, err)


    def _take(self, wait: bool, room: int) -> tuple[list[Job], bool]:
        """Up to `room` queued jobs (blocking for the first one when `wait`, then gathering
        company for batch_wait), and whether stop() was asked."""
        items, stopping = [], False
        gather_until = time.monotonic() + self.limits.batch_wait
        while len(items) < room:
            try:
                if wait and not items:
                    item = self.q.get()
                elif wait:
                    item = self.q.get(timeout=max(0.0, gather_until - time.monotonic()))
                else:
                    item = self.q.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stopping = True
                break
            items.append(item)
        return items, stopping

    def _run_stream(self):
        """Continuous batching: between two decoding steps, queued pages join the decode (up to
        max_batch pages in it), each finished page is answered at once, and pages whose request
        gave up (timed out, cancelled) leave it."""
        stream = self.model.stream(self.limits.max_tokens)
        jobs: dict[int, Job] = {}
        next_key, stopping = 0, False
        while True:
            if not stopping:
                new, stopping = self._take(wait=not jobs, room=self.limits.max_batch - len(jobs))
                new = _still_wanted(new)
                if new:
                    keys = list(range(next_key, next_key + len(new)))
                    next_key += len(new)
                    try:
                        stream.add([it.page for it in new], keys)
                        jobs.update(zip(keys, new))
                        self.batches += 1
                        self.forward_passes += 1  # one encoder pass for the pages that joined
                        self.pages += len(new)
                    except Exception as e:  # report to each request; keep serving
                        for it in new:
                            it.loop.call_soon_threadsafe(_settle, it.fut, None, e)
            now = time.monotonic()
            gone = [key for key, it in jobs.items() if it.fut.done() or it.deadline <= now]
            if gone:
                stream.drop(gone)
                for key in gone:
                    it = jobs.pop(key)
                    it.loop.call_soon_threadsafe(_settle, it.fut, None, DecodeCancelled(
                        "nobody waits for this result any more"))
                self.cancelled += len(gone)
            if not jobs:
                if stopping:
                    return
                continue
            rows = len(jobs)
            try:
                finished = stream.step()
            except Exception as e:  # report to every request in the decode; start afresh
                for it in jobs.values():
                    it.loop.call_soon_threadsafe(_settle, it.fut, None, e)
                jobs.clear()
                stream = self.model.stream(self.limits.max_tokens)
                continue
            self.decode_steps, self.row_steps = self.decode_steps + 1, self.row_steps + rows
            for key, reading in finished:
                it = jobs.pop(key)
                err = None if reading.complete else TooManyTokens(self.limits.max_tokens)
                it.loop.call_soon_threadsafe(_settle, it.fut, None if err else reading, err)


def _still_wanted(items: list[Job]) -> list[Job]:
    """The jobs whose request still waits (not timed out or cancelled already)."""
    now = time.monotonic()
    return [it for it in items if not it.fut.done() and it.deadline > now]


def _nobody_waits(items: list[Job]):
    """The batch's should_stop: True once every request has given up (its future is done:
    timed out or cancelled) or the latest deadline has passed, so no result can be used.
    Asked once per decoding step from the inference thread: reading `done()` is enough."""
    latest = max(it.deadline for it in items)
    return lambda: time.monotonic() >= latest or all(it.fut.done() for it in items)


def _settle(fut: asyncio.Future, text, err):
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(text)


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, by Content-Length up
    front or by counting a chunked body as it streams in (never buffering it first)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (f"request body larger than the limit of {self.limit} bytes "
                   f"({self.limit / 2**20:.1f} MiB); send a smaller image")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
        seen, started, too_large = 0, False, False
        refusal = JSONResponse({"detail": message}, status_code=413)

        async def counted_receive():
            nonlocal seen, too_large
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise BodyTooLarge()
            return msg

        async def guarded_send(msg):
            nonlocal started
            if too_large:  # the app turned our exception into its own error (FastAPI: 400)
                if not started and msg["type"] == "http.response.start":
                    started = True
                    await refusal(scope, receive, send)
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if too_large and not started:
            await refusal(scope, receive, send)


async def recognize_upload(model, inference: "InferenceQueue", decoders: ThreadPoolExecutor,
                           limits: Limits, data: bytes, name: str, deadline: float) -> dict:
    """Decode, preprocess and recognize one upload; errors become a status and a message."""
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    try:
        page, crop = await asyncio.wait_for(
            loop.run_in_executor(decoders, model.prepare, data, limits.max_pixels),
            max(0.0, deadline - time.monotonic()))
        if page is None:
            reading = Reading("", True, None)  # a blank image: nothing to recognize
        else:
            reading = await asyncio.wait_for(inference.submit(page, deadline, crop),
                                             max(0.0, deadline - time.monotonic()))
    except ImageTooLarge as e:
        return {"file": name, "status": 413, "error": str(e)}
    except (ImageError, TooManyTokens) as e:
        return {"file": name, "status": 422, "error": str(e)}
    except QueueFull as e:
        return {"file": name, "status": 503, "error": str(e)}
    except (asyncio.TimeoutError, DecodeCancelled):  # the decode stopped at the deadline may tell first
        return {"file": name, "status": 504, "error": f"no result within the {limits.timeout:g} s limit"}
    except Exception as e:  # a model failure: say so, keep serving
        return {"file": name, "status": 500, "error": f"inference failed: {type(e).__name__}: {e}"}
    out = {"file": name, "latex": reading.latex, "confidence": reading.confidence,
           "seconds": round(time.perf_counter() - t0, 4)}
    if reading.verified is not None:
        out["verified"] = reading.verified
    return out


def create_app(model, limits: Limits | None = None):
    """The FastAPI app around a loaded `LatexOCR` (its inference thread runs while the app does)."""
    limits = limits or Limits()
    inference = InferenceQueue(model, limits)
    decoders = ThreadPoolExecutor(max_workers=limits.preprocess_threads, thread_name_prefix="pix2tex-decode")

    @asynccontextmanager
    async def lifespan(app):
        inference.start()
        yield
        inference.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pix2tex", lifespan=lifespan)
    app.state.inference = inference
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):
        fields = ", ".join(str(e.get("loc", ["", "?"])[-1]) for e in exc.errors())
        field = "files" if request.url.path.endswith("/batch") else "file"
        return JSONResponse({"detail": f"send the image as multipart/form-data field '{field}' "
                                       f"(problem with: {fields})"}, status_code=422)

    def one(data: bytes, name: str, deadline: float):
        return recognize_upload(model, inference, decoders, limits, data, name, deadline)

    @app.post("/predict")
    async def predict(file: UploadFile = File(...)):
        deadline = time.monotonic() + limits.timeout
        result = await one(await file.read(), file.filename or "upload", deadline)
        if "error" in result:
            headers = {"Retry-After": "1"} if result["status"] == 503 else None
            return JSONResponse({"detail": result["error"]}, status_code=result["status"], headers=headers)
        return {k: v for k, v in result.items() if k != "file"}

    @app.post("/predict/batch")
    async def predict_batch(files: list[UploadFile] = File(...)):
        if len(files) > limits.max_files:
            return JSONResponse({"detail": f"{len(files)} files in one request; the limit is "
                                           f"{limits.max_files}"}, status_code=413)
        deadline = time.monotonic() + limits.timeout
        datas = [await f.read() for f in files]
        results = await asyncio.gather(*(one(d, f.filename or f"upload {i}", deadline)
                                         for i, (d, f) in enumerate(zip(datas, files))))
        return {"results": list(results)}

    @app.get("/health")
    async def health():
        # the model's file name, not its path: a public endpoint does not show the server's folders
        return {"status": "ok", "backend": model.backend, "pid": os.getpid(),
                "model": os.path.basename(os.path.normpath(model.checkpoint)),
                "queued": inference.q.qsize(), "batches": inference.batches, "pages": inference.pages,
                "forward_passes": inference.forward_passes, "cancelled": inference.cancelled,
                "continuous_batching": inference.streams, "decode_steps": inference.decode_steps,
                "row_steps": inference.row_steps,
                "limits": limits.__dict__}

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    return LimitBody(app, limits.max_upload_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pix2tex.predict import BACKENDS, SHIPPED_MODELS

    d = Limits()
    p = argparse.ArgumentParser(prog="pix2tex-serve", description="HTTP service: image of a formula -> LaTeX.")
    p.add_argument("--checkpoint", "-c", help="trained checkpoint or ONNX export folder (default: "
                                              "$PIX2TEX_CHECKPOINT, else the released model)")
    p.add_argument("--model", choices=list(SHIPPED_MODELS), default="default",
                   help="the shipped model to serve without --checkpoint: default (the reader) "
                        "or small (its distilled student, faster)")
    p.add_argument("--config", help="YAML config (default: the one stored in the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one the checkpoint names)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: the checkpoint's kind; without one, the released ONNX graphs")
    p.add_argument("--device", default="auto")
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy)")
    p.add_argument("--verify", action="store_true",
                   help="answer with the best of 5 beam candidates whose rendering matches the "
                        "image (needs TeX); responses say `verified`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8502)
    p.add_argument("--workers", type=int, default=1,
                   help="service processes behind the port, each with its own model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/onnxruntime CPU threads per process (default: cores / workers)")
    p.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--max-files", type=int, default=d.max_files)
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds per request; a decode past it is stopped (504)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="tokens per formula; one without its end within them: 422 "
                        "(default: the model's maximum)")
    p.add_argument("--queue-size", type=int, default=d.queue_size)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait * 1000)
    p.add_argument("--static-batching", action="store_true",
                   help="decode each batch taken from the queue to its end instead of letting "
                        "new pages join the running decode (for comparison)")
    p.add_argument("--max-connections", type=int, default=256, help="more concurrent connections get 503")
    a = p.parse_args(argv)
    if a.workers < 1:
        p.error(f"--workers {a.workers}: need at least 1")
    if a.threads is None and a.workers > 1:
        a.threads = max(1, (os.cpu_count() or 1) // a.workers)  # processes x threads <= cores
    return a


def app_from_args(a: argparse.Namespace):
    """Load the model `a` names and build the app (LatexOCR's errors propagate)."""
    from pix2tex.predict import LatexOCR

    limits = Limits(max_upload_bytes=a.max_upload_bytes, max_pixels=a.max_pixels, max_files=a.max_files,
                    timeout=a.timeout, max_tokens=a.max_tokens, queue_size=a.queue_size,
                    max_batch=a.max_batch, batch_wait=a.batch_wait_ms / 1000,
                    continuous=not a.static_batching)
    model = LatexOCR(a.checkpoint, config=a.config, tokenizer=a.tokenizer, device=a.device,
                     backend=a.backend, beam_width=a.beam, batch_size=a.max_batch, threads=a.threads,
                     verify=a.verify, model=a.model)
    return create_app(model, limits), model


WORKER_ARGS = "PIX2TEX_SERVE_ARGS"  # the parsed command line, for each worker process


def worker_app():
    """The app of one `--workers` process: uvicorn imports and calls this factory in each."""
    from pix2tex.predict import quiet_third_party_warnings

    quiet_third_party_warnings()
    return app_from_args(argparse.Namespace(**json.loads(os.environ[WORKER_ARGS])))[0]


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvicorn

    from pix2tex.predict import quiet_third_party_warnings

    a = parse_args(argv)
    quiet_third_party_warnings()
    try:  # in this process first, also with workers: a bad checkpoint stops here, with its reason
        app, model = app_from_args(a)
    except Exception as e:
        print(f"pix2tex-serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"pix2tex-serve: model {model.checkpoint} ({model.backend}) loaded; "
          f"http://{a.host}:{a.port}/" + (f" ({a.workers} workers)" if a.workers > 1 else ""),
          file=sys.stderr)
    run = dict(host=a.host, port=a.port, limit_concurrency=a.max_connections, log_level="warning")
    if a.workers == 1:
        uvicorn.run(app, **run)
        return
    del app, model  # each worker loads its own
    os.environ[WORKER_ARGS] = json.dumps(vars(a))
    uvicorn.run("pix2tex.serve:worker_app", factory=True, workers=a.workers, **run)


if __name__ == "__main__":
    main()
