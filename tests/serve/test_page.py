"""The web page of `maisi serve` (issue 27 item 4) in a real headless browser: Debian's chromium driven through
chromedriver's W3C WebDriver HTTP API (no client library): fill the form, submit a job, wait for it in the queue,
see its sample's preview image loaded and its files offered for download. Skipped where chromium or chromedriver is
not installed. MAISI_SERVE_SCREENSHOT=FILE.png also saves the browser's screenshot there (docs/serve-page.png)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from maisi_cli.serve.app import ServeConfig, create_app  # noqa: E402
from maisi_cli.serve.nim import ServeSettings  # noqa: E402

CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and os.access(p, os.X_OK)), None)
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier

pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs chromium and chromedriver (Debian: apt install chromium "
                                       "chromium-driver)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                         "--window-size=1200,1500"]}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})["sessionId"]

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return json.loads(answer.read())["value"]
        except urllib.error.HTTPError as failure:
            raise AssertionError(f"WebDriver {method} {path}: {failure.read()[:500]!r}") from None

    def __call__(self, method: str, path: str, body: dict | None = None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def find(self, css: str) -> str:
        return self("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def script(self, source: str, *args):
        return self("POST", "/execute/sync", {"script": source, "args": list(args)})

    def wait(self, source: str, timeout: float = 180.0):
        deadline = time.monotonic() + timeout
        while not (value := self.script(source)):
            assert time.monotonic() < deadline, f"timed out waiting for: {source}"
            time.sleep(0.25)
        return value

    def quit(self) -> None:
        self.call("DELETE", f"/session/{self.session}")


@pytest.fixture
def server(generator, tmp_path):
    settings = ServeSettings(model="demo", profile="cpu", device="cpu", steps=1, qc=True, max_attempts=1,
                             allow_any_size=True, previews=True)
    app = create_app(settings, ServeConfig(data=tmp_path / "data"), generator=generator)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5) as answer:
                if answer.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.1)
    yield port
    server.should_exit = True
    thread.join(60)


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    driver_process = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2):
                break
        except (urllib.error.URLError, OSError):
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
    driver = WebDriver(port)
    try:
        yield driver
    finally:
        driver.quit()
        driver_process.terminate()
        driver_process.wait(10)


def test_the_page_submits_a_job_and_shows_its_preview(server, browser, tmp_path):
    browser("POST", "/url", {"url": f"http://127.0.0.1:{server}/"})
    assert "model demo" in browser.wait("return document.getElementById('model').textContent.includes('demo') && "
                                        "document.getElementById('model').textContent")
    browser("POST", f"/element/{browser.find('#size')}/value", {"text": "32, 32, 32"})
    seed = browser.find("#seed")
    browser("POST", f"/element/{seed}/clear")
    browser("POST", f"/element/{seed}/value", {"text": "4"})
    browser("POST", f"/element/{browser.find('#submit')}/click")
    assert "queued: job" in browser.wait("return document.getElementById('message').textContent")
    # The queue lists it; once done, its sample's preview loads and its files are offered for download
    browser.wait("return document.querySelector('#jobs tr') !== null")
    width = browser.wait("const image = document.querySelector('#results img.preview'); "
                         "return image && image.complete && image.naturalWidth")
    assert width > 100
    state = browser.script("return document.querySelector('#jobs tr td:nth-child(2)').textContent")
    assert state == "done"
    links = browser.script("return [...document.querySelectorAll('#results a[download]')]"
                           ".map(a => a.getAttribute('href'))")
    assert any(link.endswith("/files/sample_0000_image.nii.gz") for link in links), links
    assert any(link.endswith("/files/sample_0000_label.nii.gz") for link in links), links
    card = browser.script("return document.querySelector('#results .sample').textContent")
    assert "sample_0000" in card and "run seed 4" in card and "QC " in card
    # the QC report of the checked sample is shown too
    assert browser.wait("const image = document.querySelector('#results img.qc-report'); "
                        "return image && image.complete && image.naturalWidth") > 100
    # The page's download link serves the job's image
    image_link = next(link for link in links if link.endswith("_image.nii.gz"))
    with urllib.request.urlopen(f"http://127.0.0.1:{server}{image_link}", timeout=30) as answer:
        assert answer.read(2) == b"\x1f\x8b"  # gzip
    screenshot = base64.b64decode(browser("GET", "/screenshot"))
    assert screenshot.startswith(b"\x89PNG")
    (tmp_path / "page.png").write_bytes(screenshot)
    if os.environ.get("MAISI_SERVE_SCREENSHOT"):
        Path(os.environ["MAISI_SERVE_SCREENSHOT"]).write_bytes(screenshot)
