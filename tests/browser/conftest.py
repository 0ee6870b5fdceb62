"""Browser tests of the box editor: the demo app (``python -m lib_migc.ui_demo``) in each gradio
version the WebUIs ship, driven by Playwright in Debian's Chromium.

MIGC_GRADIO_PYTHONS lists the interpreters to start the demo with, ``label=path`` separated by
commas (``tests/browser/setup_gradio_envs.sh`` makes them and prints the line). Without it the tests
are skipped; with it, a missing Chromium or Playwright is an error, not a skip. Screenshots go to
MIGC_SCREENSHOTS (default: a temp folder, printed at the end of the session).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = os.environ.get("MIGC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = os.environ.get("MIGC_SCREENSHOTS") or tempfile.mkdtemp(prefix="migc-shots-")
os.makedirs(SHOTS, exist_ok=True)


def _gradio_pythons() -> list[tuple[str, str]]:
    spec = os.environ.get("MIGC_GRADIO_PYTHONS", "").strip()
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        label, _, path = item.partition("=")
        out.append((label, path) if path else (os.path.basename(os.path.dirname(os.path.dirname(item))), item))
    return out


def pytest_generate_tests(metafunc):
    if "demo" in metafunc.fixturenames:
        pythons = _gradio_pythons()
        params = pythons or [("no-gradio", "")]
        metafunc.parametrize("demo", params, ids=[label for label, _ in params], indirect=True, scope="module")


def belongs_here(item) -> bool:
    """Whether ``item`` is a test of this folder, by its node id (relative to the rootdir), so a checkout
    that happens to sit under a folder of the same name still runs every other suite."""
    here = Path(__file__).resolve().parent.relative_to(Path(str(item.config.rootpath)).resolve()).as_posix()
    return item.nodeid.startswith(here + "/")


def pytest_collection_modifyitems(items):
    if _gradio_pythons():
        return
    for item in items:
        if belongs_here(item):
            item.add_marker(pytest.mark.skip(reason="set MIGC_GRADIO_PYTHONS (tests/browser/setup_gradio_envs.sh) to run the browser tests"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Demo:
    def __init__(self, label: str, url: str, log: str) -> None:
        self.label, self.url, self.log = label, url, log


@pytest.fixture(scope="module")
def demo(request):
    label, python = request.param
    port = _free_port()
    log_path = os.path.join(SHOTS, f"demo-{label}.log")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", no_proxy="127.0.0.1,localhost")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([python, "-m", "lib_migc.ui_demo", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo app ({label}) exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the demo app ({label}) did not answer at {url}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.5)
    yield Demo(label, url, log_path)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("MIGC_GRADIO_PYTHONS is set but Playwright is not installed (pip install playwright)")
    if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        pytest.fail(f"MIGC_GRADIO_PYTHONS is set but there is no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def shots(request):
    """save(name): a screenshot of the page into the screenshots folder, named after the test and gradio."""
    def save(page, name: str, locator: str | None = None) -> str:
        label = request.node.callspec.id if hasattr(request.node, "callspec") else "x"
        path = os.path.join(SHOTS, f"{label}-{request.node.name.split('[')[0]}-{name}.png")
        (page.locator(locator) if locator else page).screenshot(path=path)
        return path
    return save


def pytest_terminal_summary(terminalreporter):
    if _gradio_pythons():
        terminalreporter.write_line(f"box editor screenshots: {SHOTS}")
