"""The HTTP service on 127.0.0.1 (uvicorn in a thread) and its page in headless Chromium."""
import asyncio
import base64
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import threading
import time
import uuid
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pix2tex.predict import LatexOCR
from pix2tex.serve import InferenceQueue, Limits, QueueFull, create_app

LIMITS = Limits(max_upload_bytes=2 * 2**20, max_pixels=4_000_000, max_files=4, timeout=60.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and then do not suffer from a busy machine)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # LatexOCR(threads=1) below set it for the whole process


class Server:
    """uvicorn serving `app` on a free loopback port in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def request(port, method, path, body=b"", headers=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(data) if "json" in ctype else data), dict(resp.getheaders())
    finally:
        conn.close()


def multipart(files, field="file"):
    """(body, headers) of a multipart/form-data request with (filename, bytes, content_type) parts."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data, ctype in files:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                     f"filename=\"{name}\"\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_image(port, data, name="f.png", ctype="image/png", path="/predict"):
    body, headers = multipart([(name, data, ctype)])
    return request(port, "POST", path, body, headers)


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def raw_png(width, height, bit_depth, row):
    """A valid grayscale PNG of identical rows, compressed as a stream (small file, huge image)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp = zlib.compressobj(9)
    block = (b"\x00" + row) * 200
    idat = b"".join(comp.compress(block) for _ in range(height // 200)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def ocr(tiny_model):
    return LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1)


@pytest.fixture(scope="module")
def server(ocr):
    s = Server(create_app(ocr, LIMITS))
    yield s
    s.close()


@pytest.fixture(scope="module")
def images(tiny_model):
    return list(tiny_model.images[:4])


@pytest.fixture(scope="module")
def endless(tiny_model, tmp_path_factory):
    """A real model of the tiny model's architecture, untrained, with room for 2048 tokens and an
    EOS logit fixed at 0 (below the best of the ~300 others): every image decodes to the full
    length, which takes seconds. The service's runaway decode."""
    from pix2tex.checkpoint import load_checkpoint, save_checkpoint
    from pix2tex.config import load_config
    from pix2tex.models import get_model
    from pix2tex.predict import known_keys

    ckpt = load_checkpoint(tiny_model.checkpoint)
    config = dict(ckpt["config"], max_seq_len=2048)
    torch.manual_seed(0)
    model = get_model(load_config(None, base=known_keys(config)))
    with torch.no_grad():
        model.decoder.net.to_logits.weight[model.eos] = 0.0
    path = tmp_path_factory.mktemp("endless") / "endless.pth"
    save_checkpoint({"model": model.state_dict(), "config": config, "tokenizer": ckpt["tokenizer"],
                     "tokenizer_sha256": ckpt["tokenizer_sha256"]}, path)
    return LatexOCR(checkpoint=path, device="cpu", threads=1)


def assert_healthy(server, ocr, image):
    status, body, _ = request(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    status, body, _ = post_image(server.port, image.read_bytes())
    assert status == 200 and body["latex"] == ocr(image)


# --- endpoints ------------------------------------------------------------------------------

def test_health(server):
    status, body, _ = request(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["backend"] == "torch"
    assert "/" not in json.dumps(body)  # no file paths of the server
    assert body["model"] == "last.pth"


def test_predict_matches_the_api(server, ocr, images):
    for image in images:
        status, body, _ = post_image(server.port, image.read_bytes())
        assert status == 200, body
        assert body["latex"] == ocr(image) and body["seconds"] > 0
        assert body["confidence"] == ocr.read([ocr.preprocess(image)])[0].confidence


def test_verify_service_says_whether_each_answer_verified(tiny_model, images):
    """serve --verify: each answer says whether its drawing matched the image, as the API's does
    for the same image (both compare candidates with the image's ink at its own scale)."""
    verifier = LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", threads=1, verify=True)
    s = Server(create_app(verifier, LIMITS))
    try:
        for image in images[:2]:
            page, crop = verifier.preprocess(image, keep_crop=True)
            want = verifier.read([page], crops=[crop])[0]
            status, body, _ = post_image(s.port, image.read_bytes())
            assert status == 200, body
            assert body["latex"] == want.latex and body["verified"] is want.verified
    finally:
        s.close()


def test_batch_endpoint_reports_each_file(server, ocr, images, tmp_path):
    files = [(p.name, p.read_bytes(), "image/png") for p in images[:2]]
    files.append(("notes.txt", b"no picture here", "text/plain"))
    files.append(("blank.png", png(Image.new("L", (100, 40), 255)), "image/png"))
    body, headers = multipart(files, field="files")
    status, result, _ = request(server.port, "POST", "/predict/batch", body, headers)
    assert status == 200
    rows = result["results"]
    assert [r["file"] for r in rows] == [images[0].name, images[1].name, "notes.txt", "blank.png"]
    assert [r.get("latex") for r in rows[:2]] == ocr.batch(images[:2])
    assert rows[2]["status"] == 422 and "not an image" in rows[2]["error"]
    assert rows[3]["latex"] == ""
    body, headers = multipart([(p.name, p.read_bytes(), "image/png") for p in images] * 2, field="files")
    status, result, _ = request(server.port, "POST", "/predict/batch", body, headers)
    assert status == 413 and "limit is 4" in result["detail"]


def test_concurrent_requests_are_batched(server, ocr, images):
    before = request(server.port, "GET", "/health")[1]
    jobs = [images[i % len(images)] for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: post_image(server.port, p.read_bytes()), jobs))
    assert all(status == 200 for status, _, _ in answers)
    assert [body["latex"] for _, body, _ in answers] == [ocr(p) for p in jobs]
    after = request(server.port, "GET", "/health")[1]
    pages, batches = after["pages"] - before["pages"], after["batches"] - before["batches"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert pages == 16 and batches < pages  # concurrent requests were taken together
    assert len({ocr.preprocess(p).shape for p in images}) > 1  # several page sizes ...
    assert passes == batches  # ... and still one encoder pass per batch that joined
    # continuous batching (torch, greedy): pages joined the running decode, several per step
    assert after["continuous_batching"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert after["row_steps"] - before["row_steps"] > steps > 0


def test_static_batching_on_request(ocr, images):
    """--static-batching: each batch taken from the queue is decoded to its end, same answers."""
    s = Server(create_app(ocr, Limits(continuous=False)))
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: post_image(s.port, p.read_bytes()), images))
        assert [body["latex"] for _, body, _ in answers] == [ocr(p) for p in images]
        health = request(s.port, "GET", "/health")[1]
        assert not health["continuous_batching"] and health["decode_steps"] == 0
    finally:
        s.close()


# --- bad input: a clear error, and the service keeps serving ----------------------------------

@pytest.mark.parametrize("name,data,ctype,status,message", [
    ("zero.png", b"", "image/png", 422, "empty"),
    ("text.png", b"\\frac{a}{b}, a text file named .png", "image/png", 422, "not an image"),
    ("notes.txt", b"plain text upload", "text/plain", 422, "not an image"),
    ("huge.png", raw_png(20000, 20000, 8, b"\xff" * 20000), "image/png", 413, "pixels"),
    ("bomb.png", raw_png(40000, 40000, 1, b"\x00" * 5000), "image/png", 413, "pixels"),
])
def test_bad_uploads(server, ocr, images, name, data, ctype, status, message):
    got, body, _ = post_image(server.port, data, name, ctype)
    assert got == status and message in body["detail"], body
    assert_healthy(server, ocr, images[0])


def test_truncated_png(server, ocr, images):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8))
    data = png(img)
    got, body, _ = post_image(server.port, data[: len(data) // 2])
    assert got == 422 and "truncated" in body["detail"]
    assert_healthy(server, ocr, images[0])


def test_blank_and_one_pixel_images_give_empty_latex(server):
    for img in (Image.new("L", (1, 1), 0), Image.new("RGB", (400, 100), "white")):
        got, body, _ = post_image(server.port, png(img))
        assert got == 200 and body["latex"] == ""


def test_too_many_pixels_for_the_service(server):
    img = Image.new("L", (2500, 2000), 255)  # 5 MP > the 4 MP limit, a small file
    got, body, _ = post_image(server.port, png(img))
    assert got == 413 and "more than the limit of 4.0" in body["detail"]


def test_upload_over_the_byte_limit(server, ocr, images):
    big = b"\x00" * (LIMITS.max_upload_bytes + 1)
    got, body, _ = post_image(server.port, big)
    assert got == 413 and "larger than the limit" in body["detail"]
    # Chunked, with no Content-Length: counted while it streams in.
    body_bytes, headers = multipart([("big.png", big, "image/png")])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/predict", body=iter([body_bytes[i:i + 65536]
                                                 for i in range(0, len(body_bytes), 65536)]),
                 headers=headers, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and b"larger than the limit" in resp.read()
    conn.close()
    assert_healthy(server, ocr, images[0])


def test_missing_file_field(server):
    got, body, _ = request(server.port, "POST", "/predict", b"x=1",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert got == 422 and "multipart/form-data field 'file'" in body["detail"]


def test_request_timeout(ocr, images):
    s = Server(create_app(ocr, Limits(timeout=0.0)))
    try:
        got, body, _ = post_image(s.port, images[0].read_bytes())
        assert got == 504 and "limit" in body["detail"]
        assert request(s.port, "GET", "/health")[0] == 200
    finally:
        s.close()


def test_a_decode_past_the_timeout_is_stopped_and_the_service_goes_on(endless, images):
    """A runaway decode answers 504 at the timeout, and the inference thread leaves it there
    (health counts the stopped batch) instead of decoding on for the whole length: well before
    half the time of a full decode, and again for the next request, which it took at once."""
    page = endless.preprocess(images[0])
    t0 = time.perf_counter()
    _, complete = endless.recognize([page], return_complete=True)
    full = time.perf_counter() - t0
    assert complete == [False]  # it ran to max_len without EOS
    limits = Limits(timeout=full / 10)
    s = Server(create_app(endless, limits))
    try:
        for n in (1, 2):
            t0 = time.perf_counter()
            got, body, _ = post_image(s.port, images[0].read_bytes())
            assert got == 504 and f"no result within the {limits.timeout:g} s limit" in body["detail"]
            while request(s.port, "GET", "/health")[1]["cancelled"] < n:
                assert time.perf_counter() - t0 < full / 2, f"request {n}: the decode went on"
                time.sleep(0.01)
    finally:
        s.close()


def test_token_limit(ocr, endless, images):
    """A formula without its end within max_tokens is refused with 422 (not returned cut); the
    limit bounds the decode, so the endless model answers within the default timeout."""
    cases = [(endless, 5, 422), (ocr, 2, 422), (ocr, 64, 200)]  # the tiny model's formulas: ~12 tokens
    for model, max_tokens, status in cases:
        s = Server(create_app(model, Limits(max_tokens=max_tokens)))
        try:
            got, body, _ = post_image(s.port, images[0].read_bytes())
            assert got == status, body
            if status == 422:
                assert f"did not end within the limit of {max_tokens} tokens" in body["detail"]
            else:
                assert body["latex"] == ocr(images[0])
            assert request(s.port, "GET", "/health")[1]["limits"]["max_tokens"] == max_tokens
        finally:
            s.close()


def test_bounded_queue(ocr, images):
    """A full queue refuses at once (503) instead of piling up; results still reach their callers."""
    q = InferenceQueue(ocr, Limits(queue_size=2, max_batch=8))
    page = ocr.preprocess(images[0])

    async def scenario():
        deadline = time.monotonic() + 60
        futs = [q.submit(page, deadline), q.submit(page, deadline)]  # no worker yet: nothing drains
        with pytest.raises(QueueFull, match="busy"):
            q.submit(page, deadline)
        q.start()
        readings = await asyncio.wait_for(asyncio.gather(*futs), 60)
        q.stop()
        return [r.latex for r in readings]

    assert asyncio.run(scenario()) == [ocr(images[0])] * 2
    assert q.batches == 1 and q.pages == 2  # both waiting pages went through in one batch


def test_page_and_katex_are_served_locally(server):
    status, html, _ = request(server.port, "GET", "/")
    assert status == 200 and b"/static/katex/katex.min.js" in html
    assert b"cdn" not in html.lower() and b"https://" not in html
    for path in ("/static/katex/katex.min.js", "/static/katex/katex.min.css", "/static/app.js",
                 "/static/katex/fonts/KaTeX_Main-Regular.woff2"):
        assert request(server.port, "GET", path)[0] == 200, path


# --- the page in headless Chromium --------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("headless Chromium is needed for the page test: run `bash scripts/setup.sh` as "
                    "root, or `apt-get install -y --no-install-recommends chromium chromium-driver`")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for_state(driver, states=("done", "error"), timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") in states)
    return driver.execute_script("return document.body.dataset.state")


def open_page(driver, server, timeout=30):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    # KaTeX is a deferred script served from /static; a loaded CI machine can still be running it
    # when `get` returns, so wait for it, and say what the page had loaded when it never comes.
    try:
        WebDriverWait(driver, timeout).until(
            lambda d: d.execute_script("return typeof katex") == "object")
    except TimeoutException:
        state = driver.execute_script(
            "return [document.readyState, performance.getEntriesByType('resource')"
            ".map(e => e.name + ' ' + e.responseStatus)]")
        pytest.fail(f"KaTeX not loaded from /static after {timeout} s: readyState, resources = {state}")


def test_page_upload_shows_latex_copy_and_rendering(browser, server, ocr, images):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(images[0]))
    assert wait_for_state(browser) == "done"
    latex = browser.find_element(By.ID, "latex").get_attribute("value")
    assert latex == ocr(images[0]) and latex
    assert "Confidence: log p = -" in browser.find_element(By.ID, "status").text
    rendered = browser.find_element(By.ID, "rendered")
    assert rendered.find_elements(By.CSS_SELECTOR, ".katex, .katex-error")  # KaTeX drew it
    # Copy: the clipboard holds the LaTeX afterwards.
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    browser.find_element(By.ID, "copy").click()
    copied = browser.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('ERR ' + e));")
    assert copied == latex
    # Every resource came from this server: no CDN.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.url) for u in urls), urls


@pytest.mark.parametrize("event", ["paste", "drop"])
def test_page_paste_and_drop(browser, server, ocr, images, event):
    open_page(browser, server)
    data = base64.b64encode(images[1].read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'formula.png', {type: 'image/png'}));
        if (arguments[1] === 'paste') {
          document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
        } else {
          document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", data, event)
    assert wait_for_state(browser) == "done"
    assert browser.execute_script("return document.getElementById('latex').value") == ocr(images[1])


def test_page_shows_errors_and_keeps_working(browser, server, ocr, images, tmp_path):
    from selenium.webdriver.common.by import By

    bad = tmp_path / "broken.png"
    bad.write_text("this is text")
    open_page(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    assert wait_for_state(browser) == "error"
    error = browser.find_element(By.ID, "error").text
    assert "422" in error and "not an image" in error
    browser.find_element(By.ID, "file").send_keys(str(images[2]))
    assert wait_for_state(browser, ("done",)) == "done"
    assert browser.find_element(By.ID, "latex").get_attribute("value") == ocr(images[2])


def test_workers_serve_behind_one_port(tiny_model, ocr, images):
    """`pix2tex-serve --workers 2`: two service processes, each with its model, behind one port."""
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pix2tex.serve", "--checkpoint",
                             str(tiny_model.checkpoint), "--port", str(port), "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # three processes load torch and the model
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                health = request(port, "GET", "/health", timeout=5)[1]
                break
            except OSError:
                assert time.monotonic() < deadline, "the workers did not answer within 300 s"
                time.sleep(0.2)
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        workers = [int(pid) for pid in children  # uvicorn's worker processes (multiprocessing)
                   if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
        assert len(workers) == 2 and health["pid"] in workers
        jobs = [images[i % len(images)] for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: post_image(port, p.read_bytes()), jobs))
        assert [body["latex"] for _, body, _ in answers] == [ocr(p) for p in jobs]
    finally:
        proc.terminate()  # a worker still loading its model exits once it has loaded
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too
            raise


def test_serve_command_refuses_a_missing_checkpoint(tmp_path, capsys):
    from pix2tex.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "nope.pth"), "--port", "0"])
    assert exit_.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_serve_small_model(monkeypatch, tiny_model, tmp_path, ocr, images, capsys):
    """--model small serves the shipped student; without it the command says what to do."""
    import pix2tex.predict as P
    from pix2tex.serve import app_from_args, main, parse_args

    student = tmp_path / "pix2tex-small.pth"
    monkeypatch.setitem(P.SHIPPED_MODELS, "small", student)
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "small", "--port", "0"])
    assert exit_.value.code == 2 and "no small model" in capsys.readouterr().err
    shutil.copy(tiny_model.checkpoint, student)
    _, model = app_from_args(parse_args(["--model", "small", "--threads", "1"]))
    assert model.checkpoint == str(student) and model.batch([images[0]]) == [ocr(images[0])]
