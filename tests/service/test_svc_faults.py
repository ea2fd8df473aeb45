"""Infrastructure faults, for real: a PostgreSQL that stops and comes back, and a storage volume that
is full (a small tmpfs). Each answers as what it is (503, 507), never a 500, and leaves nothing behind."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from faults import Tmpfs, own_postgres
from svc_helpers import (CLASSES, REDIS_DB, Proc, RecordingQueue, Stack, base_env, free_port, images, settings_of,
                         wait_http)

NO_SPACE = "no space left on the storage volume"


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    return response.json()


def noise_png(seed: int, side: int = 200) -> bytes:
    """An image PNG cannot compress (random pixels): about 3 bytes a pixel, on disk and re-encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.service
@pytest.mark.slow
def test_database_down_is_a_503_with_retry_after_one_log_line_and_recovers(tmp_path, tiny_checkpoint):
    postgres = own_postgres()
    postgres.start()
    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_DATABASE_URL=postgres.url,
                   UPT_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}", UPT_QUEUE=f"upt-test-{uuid.uuid4().hex[:8]}",
                   UPT_REQUIRE_API_KEYS="true", UPT_PRELOAD_BACKBONE="false")
    stack = Stack(env, tmp_path)
    try:
        stack.command("migrate")
        stack.keys["acme"] = json.loads(stack.command("keys", "create", "--tenant", "acme", "--json"))["key"]
        stack.start_api()
        client = stack.client("acme")
        assert client.get("/tasks").status_code == 200

        postgres.stop()
        logged_before = stack.api.log.read_text()
        for _ in range(4):
            for response in (client.get("/tasks"), client.get(f"/tasks/{'a' * 32}"),
                             client.post("/classify", data={"class_names": CLASSES},
                                         files=[("files", ("a.png", noise_png(0, 8), "image/png"))])):
                body = assert_problem(response, 503)
                assert body["type"].endswith("/database-unavailable"), body
                assert int(response.headers["retry-after"]) > 0
        time.sleep(2.5)  # two sweeps of the API's recovery sweeper meet the outage too
        logged = stack.api.log.read_text()[len(logged_before):]
        assert "Traceback" not in logged, logged
        assert sum("database unavailable" in line for line in logged.splitlines()) == 1, logged

        postgres.start()
        deadline = time.monotonic() + 30
        while (status := client.get("/tasks").status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, status
            time.sleep(0.5)
    finally:
        if stack.api is not None:
            stack.api.stop()
        postgres.remove()


@pytest.fixture
def full_volume(tmp_path):
    volume = Tmpfs(tmp_path / "volume", 8 * 1024 * 1024)
    yield volume
    volume.unmount()


def serve_on(volume: Tmpfs, tmp_path, tiny_checkpoint) -> tuple[Proc, str]:
    """`upt serve` with its storage on the small volume and its SQLite database elsewhere."""
    port = free_port()
    env = base_env(volume.mountpoint, tiny_checkpoint, UPT_DATABASE_URL=f"sqlite:///{tmp_path / 'upt.sqlite'}",
                   UPT_PORT=port)
    proc = Proc([sys.executable, "-m", "service", "serve", "--no-worker"], env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url, proc)
    return proc, url


@pytest.mark.service
def test_a_full_disk_is_a_507_and_the_request_leaves_nothing(full_volume, tmp_path, tiny_checkpoint):
    proc, url = serve_on(full_volume, tmp_path, tiny_checkpoint)
    try:
        client = httpx.Client(base_url=url, timeout=120)
        pngs = [noise_png(seed) for seed in range(8)]  # about 120 KB each
        labels = [CLASSES[i % 2] for i in range(8)]
        data = {"class_names": CLASSES[:2], "labels": labels, "method": "coop", "epochs": "1", "shots": "1"}
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
        upload = sum(len(p) for p in pngs)
        # Room for the upload's scratch copy, not for the images stored beside it: it fails half-way.
        filler = full_volume.fill(leave_bytes=int(upload * 1.5))
        body = assert_problem(client.post("/tasks", data=data, files=files), 507)
        assert NO_SPACE in body["detail"]
        # The API process's scratch-owner lock (service.scratch) is its own, held while it lives.
        left = [f for f in full_volume.files("storage") if f.parent.name != "tmp-owners"]
        assert left == [], "the refused request left files behind"
        assert client.get("/tasks").json()["items"] == []

        full_volume.fill(leave_bytes=64 * 1024)
        body = assert_problem(client.post("/classify", data={"class_names": CLASSES[:2]}, files=files[:4]), 507)
        assert NO_SPACE in body["detail"]
        assert [f for f in full_volume.files("storage") if f.parent.name != "tmp-owners"] == []

        filler.unlink()  # space again: the same request is accepted
        assert client.post("/tasks", data=data, files=files).status_code == 202
    finally:
        proc.stop()


@pytest.fixture
def worker_on_full_volume(full_volume, tmp_path, tiny_checkpoint, monkeypatch, start_worker_process):
    """The worker's training function in this process, its storage on the small volume."""
    from service.migrate import upgrade
    import worker.tasks as worker_tasks

    settings = settings_of(base_env(full_volume.mountpoint, tiny_checkpoint,
                                    UPT_DATABASE_URL=f"sqlite:///{tmp_path / 'upt.sqlite'}", UPT_MAX_ATTEMPTS=3,
                                    UPT_DISK_FULL_RETRY_S=7, UPT_DISK_FULL_RETRY_MAX_S=10))
    upgrade(settings)
    start_worker_process(settings)
    monkeypatch.setattr(worker_tasks, "_backbone", None)
    return full_volume, RecordingQueue()


def queued_task(epochs: int = 2) -> str:
    """A queued task, written with the database and storage of the worker started in this process."""
    from service.models import Task, Tenant, utcnow
    from service.storage import Storage
    from upt.training import TrainConfig
    from worker.tasks import get_settings, session_scope

    config = TrainConfig.of(method="coop", shots=2, epochs=epochs, batch_size=4)
    config.class_names = CLASSES[:2]
    with session_scope() as session:
        tenant = session.query(Tenant).filter_by(name="t").one_or_none() or Tenant(name="t")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, status="queued", method="coop", config=config.to_dict(),
                    class_names=CLASSES[:2], num_images=8, model="upt-tiny", pretrained="x", enqueued_at=utcnow())
        session.add(task)
        session.flush()
        task_id = task.id
    data = Storage.from_settings(get_settings()).data_dir(task_id)
    for name, path in images("train", 4):
        if name in CLASSES[:2]:
            (data / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / name / path.name)
    return task_id


def row(task_id: str):
    from service.models import Task
    from worker.tasks import session_scope

    with session_scope() as session:
        return session.get(Task, task_id)


@pytest.mark.service
def test_training_on_a_full_disk_says_so_and_retries_with_back_off(worker_on_full_volume):
    from worker.tasks import run_task

    volume, queue = worker_on_full_volume
    task_id = queued_task()
    filler = volume.fill(leave_bytes=0)
    for attempt, delay in ((1, 7), (2, 10)):  # 7 s, then doubled but bounded by UPT_DISK_FULL_RETRY_MAX_S
        run_task(task_id, queue)
        task = row(task_id)
        assert task.status == "queued" and task.attempts == attempt, (task.status, task.error)
        assert NO_SPACE in task.error and "inline_container" not in task.error
        assert (queue.sent[-1], queue.countdowns[-1]) == (task_id, delay)
        assert not list(volume.mountpoint.rglob("*.tmp")), "a half-written checkpoint was left"
    filler.unlink()  # space again: the third try trains to the end
    run_task(task_id, queue)
    task = row(task_id)
    assert task.status == "succeeded" and task.error is None, task.error

    other = queued_task()
    volume.fill(leave_bytes=0)
    for _ in range(3):
        run_task(other, queue)
    task = row(other)
    assert task.status == "failed" and NO_SPACE in task.error and "UPT_MAX_ATTEMPTS" in task.error
    assert task.finished_at is not None


@pytest.mark.service
def test_a_full_compiled_folder_still_serves_the_compiled_encoder(tmp_path, tiny_checkpoint):
    """The compiled graphs cannot be cached on a full volume: the API serves OpenVINO all the same
    (before: it fell back to PyTorch fp32, several times slower, on an "iostream error"), says why in
    /readyz's detail, and leaves no half-written file."""
    from service.serving_cache import ServingCache
    from service.settings import Settings

    volume = Tmpfs(tmp_path / "compiled", 1024 * 1024)  # the API's compiled folder (UPT_DATA_DIR/compiled)
    try:
        volume.fill(leave_bytes=0)
        settings = Settings(model="upt-tiny", pretrained=str(tiny_checkpoint), device="cpu", data_dir=tmp_path,
                            serve_runtime="openvino", serve_precision="fp32")
        serving = ServingCache(settings)
        serving.start_loading().join(300)
        ready, detail = serving.encoder_status()
        assert ready and detail.startswith("openvino fp32 on cpu"), detail
        assert "not cached (no space left on the device)" in detail, detail
        assert volume.files() == []
    finally:
        volume.unmount()
