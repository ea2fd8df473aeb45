"""Time from POST /tasks to the first successful /classify with that task, with 0 and with N other tasks
already training (the issue: the first answer must not wait for the queue).

Embedded mode (`upt serve`: API + one worker, SQLite, filesystem broker) with the tiny backbone on this
machine. The "other" tasks are long trainings: the only worker trains one and the rest wait; the measured task
is queued behind them, and only its instant stage (built by the API process) can answer. Prints the two
times and their ratio (1.0 means the queue does not matter), measured in one run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "fashion_mnist"
WEIGHTS = ROOT / "upt" / "weights" / "upt-tiny-fashion-mnist.safetensors"


def form(per_class: int, method: str, epochs: int) -> tuple[dict, list]:
    classes = sorted(p.name for p in (FIXTURES / "train").iterdir() if p.is_dir())
    chosen = [(c, p) for c in classes for p in sorted((FIXTURES / "train" / c).glob("*.png"))[:per_class]]
    data = {"class_names": classes, "labels": [c for c, _ in chosen], "method": method, "epochs": str(epochs),
            "batch_size": "2"}
    return data, [("files", (p.name, p.read_bytes(), "image/png")) for _, p in chosen]


def first_answer_seconds(client: httpx.Client, per_class: int) -> float:
    image = sorted((FIXTURES / "test" / "bag").glob("*.png"))[0]
    data, files = form(per_class, "upt", 200)
    started = time.perf_counter()
    task_id = client.post("/tasks", data=data, files=files).json()["id"]
    while True:
        answer = client.post("/classify", data={"task_id": task_id},
                             files=[("files", (image.name, image.read_bytes(), "image/png"))])
        if answer.status_code == 200:
            return time.perf_counter() - started
        if answer.status_code not in (409, 503):
            raise SystemExit(f"/classify answered {answer.status_code}: {answer.text}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--others", type=int, default=3, help="tasks training before the measured one")
    parser.add_argument("--per-class", type=int, default=8, help="training images per class of each task")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = tempfile.mkdtemp(prefix="upt-bench-first-answer-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPT_")} | {
        "UPT_MODEL": "upt-tiny", "UPT_PRETRAINED": str(WEIGHTS), "UPT_DEVICE": "cpu", "UPT_DATA_DIR": data_dir,
        "UPT_LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "upt", "serve", "--port", str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        # Warm-up (first imports and allocations in the API and the worker), then an idle worker again.
        first_answer_seconds(client, args.per_class)
        for task in client.get("/tasks").json()["items"]:
            client.post(f"/tasks/{task['id']}/cancel")
        while any(t["status"] not in ("cancelled", "failed", "succeeded") for t in client.get("/tasks").json()["items"]):
            time.sleep(0.2)
        idle = first_answer_seconds(client, args.per_class)
        for _ in range(args.others):  # long trainings: the one worker stays busy with them
            data, files = form(args.per_class, "upt", 200)
            client.post("/tasks", data=data, files=files)
        while not any(t["status"] == "running" for t in client.get("/tasks").json()["items"]):
            time.sleep(0.2)
        busy = first_answer_seconds(client, args.per_class)
        ahead = [t["status"] for t in client.get("/tasks").json()["items"][1:]]  # all but the measured one
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    print(f"embedded upt serve, upt-tiny on cpu, {args.per_class} images per class, 4 classes")
    print(f"POST /tasks -> first 200 from /classify, 0 other tasks:           {idle:6.2f} s")
    waiting = f"{ahead.count('running')} training, {ahead.count('queued')} queued"
    print(f"POST /tasks -> first 200 from /classify, {waiting} ahead of it: {busy:6.2f} s")
    print(f"ratio (busy / idle): {busy / idle:.2f}  (the one worker's training shares this machine's CPU cores "
          "with the API's cache build; the queue itself is not waited for)")


if __name__ == "__main__":
    main()
