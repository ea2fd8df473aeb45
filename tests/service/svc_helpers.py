"""Helpers of the service tests: fixture images, forms, subprocesses and polling."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
import zipfile
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "fashion_mnist"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Each test session flushes its Redis database: concurrent runs (several checkouts on one machine)
# pick different ones with UPT_TEST_REDIS_DB.
REDIS_DB = int(os.environ.get("UPT_TEST_REDIS_DB", "11"))
# The one origin the stack's CORS allow-list (UPT_CORS_ORIGINS) names: a team's dashboard elsewhere.
ALLOWED_ORIGIN = "https://labels.example.com"
CLASSES = sorted(p.name for p in (FIXTURES / "train").iterdir() if p.is_dir())


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A PostgreSQL database of its own on the shared server (never the shared ones), dropped after; yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def images(split: str, per_class: int) -> list[tuple[str, Path]]:
    """(class, path) for the first `per_class` Fashion-MNIST images of each class."""
    return [(name, path) for name in CLASSES
            for path in sorted((FIXTURES / split / name).glob("*.png"))[:per_class]]


def task_form(per_class: int = 4, method: str = "coop", **options) -> tuple[dict, list]:
    """(data, files) for httpx: `class_names`, `labels` and `files` as the HTTP contract wants them."""
    chosen = images("train", per_class)
    data = {"class_names": list(CLASSES), "method": method, "labels": [c for c, _ in chosen]}
    data.update({k: str(v) for k, v in options.items()})
    files = [("files", (p.name, p.read_bytes(), "image/png")) for _, p in chosen]
    return data, files


def zip_of_classes(per_class: int = 4) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, path in images("train", per_class):
            archive.write(path, f"{name}/{path.name}")
    return buffer.getvalue()


class Proc:
    """A service or worker subprocess with its output in a log file, shown when a test fails."""

    def __init__(self, argv: list[str], env: dict, log: Path) -> None:
        self.log = log
        self.handle = open(log, "ab")
        self.popen = subprocess.Popen(argv, env=env, cwd=env.get("UPT_TEST_CWD", ROOT), stdout=self.handle,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill_group(self) -> None:
        """SIGKILL the process and its children, as when a machine or container dies."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.send(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return -9
        finally:
            self.handle.close()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_http(base_url: str, proc: Proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"server exited early:\n{proc.tail()}")
        try:
            if httpx.get(f"{base_url}/livez", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server did not answer within {timeout}s:\n{proc.tail()}")


@contextmanager
def api_process(env: dict, log: Path) -> Iterator[str]:
    """`upt serve --no-worker` in a process of its own with `env`, its output in `log`; yields its URL."""
    port = free_port()
    server = Proc([sys.executable, "-m", "service", "serve", "--no-worker", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, server)
        yield url
    finally:
        server.stop()


@contextmanager
def api_without_weights(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[str]:
    """An API (no worker) told to serve ViT-B-16 from a weights file that does not exist; yields its URL."""
    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_MODEL="ViT-B-16",
                   UPT_PRETRAINED=str(tmp_path / "no-such-weights.safetensors"))
    with api_process(env, tmp_path / "serve.log") as url:
        yield url


@contextmanager
def api_in_process(tmp_path: Path, tiny_checkpoint: Path, **settings) -> Iterator[tuple[str, object, dict]]:
    """An API served by uvicorn in a thread of this process (its app.state can be watched and
    patched), on a scratch PostgreSQL database, the tiny backbone served by PyTorch, API keys
    required; `settings` override the Settings fields. Yields (base URL, app, headers of a key)."""
    import uvicorn

    from service.app import create_app
    from service.auth import create_key
    from service.db import Database
    from service.migrate import upgrade
    from service.settings import Settings

    with scratch_database("upt_inproc") as url:
        chosen = Settings(**({"model": "upt-tiny", "pretrained": str(tiny_checkpoint), "device": "cpu",
                              "data_dir": tmp_path, "database_url": url, "require_api_keys": True,
                              "serve_runtime": "pytorch"} | settings))
        upgrade(chosen)
        database = Database.from_settings(chosen)
        with database.scope() as session:
            key = create_key(session, "acme")
        database.dispose()
        app = create_app(chosen)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.config.port}"
        try:
            wait_until(lambda: _answers_ready(base), "the API to be ready")
            yield base, app, {"Authorization": f"Bearer {key}"}
        finally:
            server.should_exit = True
            thread.join(timeout=20)


def _answers_ready(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(client: httpx.Client, task_id: str, statuses: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    task = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if task.get("status") in statuses:
            return task
        time.sleep(0.3)
    raise AssertionError(f"task {task_id} not in {statuses} after {timeout}s: {task}")


def wait_for_stage(client: httpx.Client, task_id: str, stage: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    task = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        if task["stages"][stage]["state"] in states:
            return task
        time.sleep(0.3)
    raise AssertionError(f"stage {stage} of task {task_id} not in {states} after {timeout}s: {task}")


def classify_with_task(client: httpx.Client, task_id: str, **extra) -> httpx.Response:
    """/classify of one of the fixture's test images by a task (`extra`: e.g. stage)."""
    (_, path), = images("test", 1)[:1]
    return client.post("/classify", data={"task_id": task_id, **extra},
                       files=[("files", (path.name, path.read_bytes(), "image/png"))])


def assert_served_as_upt_predicts(client: httpx.Client, task_id: str, served: list[dict],
                                  test_images: list[tuple[str, Path]], tmp_path: Path, top_k: int,
                                  pretrained: str) -> dict:
    """`served` (a /classify answer's predictions for `test_images`) equals what `upt predict` says with
    the task's artifact, downloaded as a zip, and the user's own copy of the weights (`pretrained`: the
    zip names the server's by file and sha256, not by path): labels in order, probabilities to 1e-5.
    Returns the artifact's adapter_config.json."""
    import pytest

    archive = client.get(f"/tasks/{task_id}/artifact")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(archive.content)).extractall(tmp_path)
    cli = subprocess.run([str(Path(sys.executable).parent / "upt"), "predict", "--artifact", str(tmp_path / task_id),
                          "--pretrained", pretrained, "--top-k", str(top_k), "--device", "cpu", "--json",
                          *[str(p) for _, p in test_images]],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)["predictions"]
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert [x["label"] for x in got["labels"]] == [w["label"] for w in want["top"]]
        assert [x["probability"] for x in got["labels"]] == pytest.approx([w["probability"] for w in want["top"]],
                                                                          abs=1e-5)
    return json.loads((tmp_path / task_id / "adapter_config.json").read_text())


def wait_until(check, what: str, timeout: float = 60):
    """`check()`'s first truthy value, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")


def base_env(data_dir: Path, tiny_checkpoint: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPT_")}
    env.update({
        "UPT_MODEL": "upt-tiny",
        "UPT_PRETRAINED": str(tiny_checkpoint),
        "UPT_DEVICE": "cpu",
        "UPT_DATA_DIR": str(data_dir),
        # Fast recovery, so that tests of it take seconds rather than minutes.
        "UPT_HEARTBEAT_INTERVAL_S": "0.5",
        "UPT_HEARTBEAT_TIMEOUT_S": "5",
        "UPT_REQUEUE_AFTER_S": "3",
        "UPT_SWEEP_INTERVAL_S": "1",
        # An instant stage left `building` by a dead API is built again by the sweeper after this.
        "UPT_INSTANT_RESUME_AFTER_S": "3",
        "UPT_LOG_LEVEL": "info",
        # PyTorch serves /classify in most service tests: compiling the OpenVINO encoder costs every
        # start tens of seconds on a busy 2-core machine. test_svc_embedded serves with the default.
        "UPT_SERVE_RUNTIME": "pytorch",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def settings_of(env: dict):
    """The settings a process started with `env` builds, for code run in the test's own process."""
    from service.settings import Settings

    return Settings(**{name.removeprefix("UPT_").lower(): value for name, value in env.items()
                       if name.startswith("UPT_")})


class Stack:
    """PostgreSQL + Redis + an API process; workers are started by the tests that need them."""

    def __init__(self, env: dict, tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: Proc | None = None
        self.keys: dict[str, str] = {}

    def command(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "service", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start_api(self) -> None:
        self.api = Proc([sys.executable, "-m", "service", "serve", "--no-worker", "--port", str(self.port)],
                        self.env, self.tmp / "api.log")
        wait_http(self.url, self.api)

    def start_worker(self, name: str = "worker") -> Proc:
        return Proc([sys.executable, "-m", "worker"], self.env, self.tmp / f"{name}.log")

    def new_tenant(self, prefix: str) -> str:
        """A tenant of its own with a key, for a test that must see only its own tasks on the shared stack."""
        tenant = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.keys[tenant] = json.loads(self.command("keys", "create", "--tenant", tenant, "--json"))["key"]
        return tenant

    def client(self, tenant: str = "acme") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {self.keys[tenant]}"})




def skew_host_clock(monkeypatch, offset_s: float) -> None:
    """This host's clock `offset_s` off, as the service reads it: every `utcnow` bound in a loaded module
    of service/ or worker/ (a host whose clock disagrees with the database's and with other hosts')."""
    from datetime import timedelta

    from service import models

    true_now = models.utcnow
    skewed = lambda: true_now() + timedelta(seconds=offset_s)  # noqa: E731
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("service", "worker") and getattr(module, "utcnow", None) is true_now:
            monkeypatch.setattr(module, "utcnow", skewed)


class RecordingQueue:
    """Stands for service.queue.TrainingQueue: records the task ids it is asked to send, with their
    countdowns, instead of publishing them."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.countdowns: list[float | None] = []

    def enqueue(self, task_id: str, countdown: float | None = None) -> bool:
        self.sent.append(task_id)
        self.countdowns.append(countdown)
        return True
