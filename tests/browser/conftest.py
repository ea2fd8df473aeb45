"""Fixtures for the browser tests: Debian's Chromium driven by Playwright (never a downloaded browser),
the real service started as `upt serve` on a free port, and a fake of the HTTP contract for fast UI checks.

Every page records the requests it makes; a test fails if any goes to another origin than the service.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where the screenshots for the README go; UPT_SCREENSHOTS_DIR sends them elsewhere (keeps a checkout clean).
SCREENSHOTS = Path(os.environ.get("UPT_SCREENSHOTS_DIR") or ROOT / "docs" / "screenshots")
CHROMIUM = os.environ.get("UPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"the service exited with {proc.returncode} before it was ready:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read()[:300]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    raise RuntimeError(f"the service at {url} was not ready within {timeout:.0f}s ({last}):\n{tail}")


# ---------------------------------------------------------------------------------------- browser

@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class OriginGuard:
    """Records every request of a browser context; anything not on the service's origin (or one of
    `also`, for a page on another origin that calls the service) is a failure."""

    def __init__(self, base_url: str, also: tuple[str, ...] = ()):
        self.origin = "{0.scheme}://{0.netloc}".format(urlsplit(base_url))
        self.allowed = {self.origin, *("{0.scheme}://{0.netloc}".format(urlsplit(url)) for url in also)}
        self.foreign: list[str] = []
        self.requests: list[str] = []

    def __call__(self, request) -> None:
        url = request.url
        self.requests.append(f"{request.method} {url}")
        if url.startswith("data:"):
            return
        inner = url[len("blob:"):] if url.startswith("blob:") else url
        parts = urlsplit(inner)
        if f"{parts.scheme}://{parts.netloc}" not in self.allowed:
            self.foreign.append(url)

    def check(self) -> None:
        assert not self.foreign, f"the page made requests outside the service ({self.origin}): {self.foreign}"


@pytest.fixture
def open_page(browser):
    """open_page(base_url, width=1280, height=900) -> (page, guard); the guard is checked at teardown."""
    opened = []

    def _open(base_url: str, width: int = 1280, height: int = 900, also: tuple[str, ...] = (), **context_args):
        context = browser.new_context(viewport={"width": width, "height": height}, **context_args)
        guard = OriginGuard(base_url, also)
        context.on("request", guard)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())  # confirm() before deleting
        page.set_default_timeout(20_000)
        opened.append((context, guard, errors))
        page.js_errors = errors
        return page, guard

    yield _open
    for context, guard, errors in opened:
        context.close()
        guard.check()
        assert not errors, f"JavaScript errors on the page: {errors}"


# ------------------------------------------------------------------------------ the real service

def _upt_command() -> list[str]:
    """`upt` from this environment when its CLI is there, else the service's own `python -m service`."""
    exe = Path(sys.executable).parent / "upt"
    try:
        import upt.cli  # noqa: F401

        if exe.exists():
            return [str(exe)]
        return [sys.executable, "-c", "import sys; from upt.cli import main; sys.exit(main())"]
    except ImportError:
        return [sys.executable, "-m", "service"]


@pytest.fixture(scope="session")
def other_origin() -> str:
    """The origin of a page that is not the service's (another local port), allowed by the service's CORS list."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def real_service(tmp_path_factory, other_origin):
    """`upt serve` (embedded mode: API + worker, SQLite, filesystem broker) on the pretrained tiny backbone, with
    API keys required and pages on `other_origin` allowed. Yields {"url", "key"}. UPT_TEST_SERVICE_URL
    (+ UPT_TEST_API_KEY) uses a running one."""
    if os.environ.get("UPT_TEST_SERVICE_URL"):
        key = os.environ.get("UPT_TEST_API_KEY", "")
        yield {"url": os.environ["UPT_TEST_SERVICE_URL"].rstrip("/"), "key": key, "new_key": lambda tenant: key}
        return
    from upt.tiny import PRETRAINED_TINY

    tmp = tmp_path_factory.mktemp("upt-service")
    checkpoint = PRETRAINED_TINY  # the tiny CLIP pretrained on Fashion-MNIST: sensible predictions on screen
    base_cmd = _upt_command()
    # Only this test's settings: nothing inherited (another test's UPT_DATABASE_URL would point elsewhere).
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("UPT_")}
    env = dict(inherited, UPT_DATA_DIR=str(tmp / "data"), UPT_MODEL="upt-tiny", UPT_PRETRAINED=str(checkpoint),
               UPT_HOST="127.0.0.1", UPT_REQUIRE_API_KEYS="true", UPT_LOG_LEVEL="warning", PYTHONUNBUFFERED="1",
               UPT_HEARTBEAT_INTERVAL_S="1", UPT_SWEEP_INTERVAL_S="2", UPT_CORS_ORIGINS=other_origin,
               # This checkout first, whatever an older editable install registered (namespace packages).
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(base_cmd + ["keys", "create", "--tenant", "browser-test", "--json"], env=env, cwd=tmp,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout.strip().splitlines()[-1])["key"]

    def new_key(tenant: str) -> str:
        """A key of another tenant, so that a test's tasks stay out of the other tests' lists."""
        made = subprocess.run(base_cmd + ["keys", "create", "--tenant", tenant, "--json"], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr
        return json.loads(made.stdout.strip().splitlines()[-1])["key"]

    port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(base_cmd + ["serve", "--port", str(port)], env=env, cwd=tmp, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 240, proc, log)
        yield {"url": url, "key": key, "log": log, "new_key": new_key}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group: `serve` and its embedded worker
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------ the fake service

@pytest.fixture
def fake_service():
    """fake_service(api_key=None, epoch_seconds=1.0) -> base URL of the contract's fake, in a thread."""
    import uvicorn

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_service import create_app

    servers = []

    def _start(api_key: str | None = None, epoch_seconds: float = 1.0) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(api_key, epoch_seconds), host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_ready(f"http://127.0.0.1:{port}", 20)
        return f"http://127.0.0.1:{port}"

    yield _start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def screenshots_dir():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="session")
def fixture_images():
    root = ROOT / "tests" / "fixtures" / "fashion_mnist"
    if not root.exists():
        pytest.fail("tests/fixtures/fashion_mnist is missing (scripts/make_fashion_fixture.py writes it)")
    return root
