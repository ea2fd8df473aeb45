"""Embedded mode, started with the README's own command: `upt serve` (SQLite, filesystem broker,
a worker process beside the API, storage in ./var). Ctrl-C, start again: everything is still there,
and a training interrupted by the stop finishes after the restart."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from svc_helpers import CLASSES, Proc, base_env, free_port, images, task_form, wait_for, wait_http, zip_of_classes

pytestmark = pytest.mark.slow
UPT = str(Path(sys.executable).parent / "upt")


def start(env: dict, tmp: Path, name: str) -> tuple[Proc, str]:
    proc = Proc([UPT, "serve"], env, tmp / f"{name}.log")
    url = f"http://127.0.0.1:{env['UPT_PORT']}"
    wait_http(url, proc)
    return proc, url


def wait_ready(client: httpx.Client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not client.get("/readyz").json()["ready"]:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.3)


def _labels(classified: dict) -> list:
    return [[label["label"] for label in p["labels"]] for p in classified["predictions"]]


def _probabilities(classified: dict) -> list:
    return [label["probability"] for p in classified["predictions"] for label in p["labels"]]


def worker_pid(proc: Proc) -> int:
    for line in proc.log.read_text().splitlines():
        if "started a worker (pid" in line:
            return int(line.split("(pid ")[1].split(")")[0])
    raise AssertionError(proc.tail())


def gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_upt_serve_alone_runs_everything_and_keeps_it_across_restarts(tmp_path, tiny_checkpoint):
    env = base_env(tmp_path / "unused", tiny_checkpoint, UPT_PORT=free_port(), UPT_TEST_CWD=tmp_path)
    del env["UPT_DATA_DIR"]  # the default: ./var in the working directory
    del env["UPT_SERVE_RUNTIME"]  # the default: OpenVINO, which `make serve` installs
    first, url = start(env, tmp_path, "serve-1")
    client = httpx.Client(base_url=url, timeout=60)  # no key: bound to 127.0.0.1 only
    try:
        assert "API keys are NOT required" in first.log.read_text()
        wait_ready(client, timeout=300)  # the image encoder is compiled once, at start
        assert client.get("/readyz").json()["checks"]["image_encoder"]["detail"].startswith("openvino ")
        assert "<html" in client.get("/").text.lower()  # the web client
        created = client.post("/tasks", data={"method": "coop", "shots": "2", "epochs": "2"},
                              files={"archive": ("fashion.zip", zip_of_classes(4), "application/zip")})
        assert created.status_code == 202, created.text
        task = wait_for(client, created.json()["id"], {"succeeded", "failed"})
        assert task["status"] == "succeeded", first.tail()
        test_files = [("files", (p.name, p.read_bytes(), "image/png")) for _, p in images("test", 1)]
        before = client.post("/classify", data={"task_id": task["id"]}, files=test_files).json()
        # A longer training, stopped with the service mid-way.
        data, files = task_form(per_class=12, shots=8, epochs=10, batch_size=4)
        long_task = client.post("/tasks", data=data, files=files).json()
        deadline = time.monotonic() + 60
        while not client.get(f"/tasks/{long_task['id']}/events").json()["items"]:
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.2)
    finally:
        pid = worker_pid(first)
        assert first.stop(signal.SIGINT) == 0  # Ctrl-C
    assert gone(pid), "the embedded worker outlived `upt serve`"
    assert (tmp_path / "var" / "upt.sqlite").is_file()

    assert list((tmp_path / "var" / "compiled").glob("*/prompted.xml"))  # converted once, kept on disk
    second, url = start(env, tmp_path, "serve-2")
    try:
        wait_ready(client, timeout=300)
        again = client.get(f"/tasks/{task['id']}").json()
        assert again["status"] == "succeeded" and again["metrics"] == task["metrics"]
        assert len(client.get(f"/tasks/{task['id']}/events").json()["items"]) == 2
        after = client.post("/classify", data={"task_id": task["id"]}, files=test_files).json()
        # The same predictions; a compiled encoder may pick other kernels in a new process (last float bits)
        assert _labels(after) == _labels(before)
        assert _probabilities(after) == pytest.approx(_probabilities(before), abs=1e-6)
        assert client.get(f"/tasks/{task['id']}/artifact").status_code == 200
        resumed = wait_for(client, long_task["id"], {"succeeded", "failed"}, timeout=120)
        assert resumed["status"] == "succeeded", second.tail()
        assert [e["epoch"] for e in client.get(f"/tasks/{long_task['id']}/events").json()["items"]] == list(range(1, 11))
        assert before["class_names"] == CLASSES
    finally:
        pid = worker_pid(second)
        second.stop(signal.SIGINT)
    assert gone(pid)
