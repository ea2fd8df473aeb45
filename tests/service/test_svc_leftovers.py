"""Nothing is shown that should not be, nothing is left behind: server paths, the broker's control
folder, upload scratch and task folders of killed requests, duplicate messages, clocks, scrapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from svc_helpers import CLASSES, ROOT, base_env, images, task_form


def test_the_filesystem_broker_writes_nothing_in_the_working_directory(tmp_path, tiny_checkpoint):
    env = base_env(tmp_path / "data", tiny_checkpoint)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-c", "from service.dispatch import enqueue; assert enqueue('0' * 32)"],
                          env={**env, "PYTHONPATH": str(ROOT)}, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.listdir(cwd) == [], "Kombu's filesystem transport wrote into the working directory"
    assert (tmp_path / "data" / "broker" / "control").is_dir()


@pytest.mark.service
def test_no_server_path_in_readyz_or_task_json(stack):
    checkpoint = stack.env["UPT_PRETRAINED"]
    ready = httpx.get(f"{stack.url}/readyz").text  # unauthenticated
    assert checkpoint not in ready and str(stack.tmp) not in ready, ready
    assert "upt-tiny.pt" in ready
    client = stack.client("acme")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    task = client.post("/tasks", data=data, files=files).json()
    assert task["pretrained"].startswith("upt-tiny.pt (sha256 ") and "/" not in task["pretrained"], task
    listed = client.get("/tasks").text
    assert checkpoint not in listed and str(stack.tmp) not in listed
    assert client.delete(f"/tasks/{task['id']}").status_code == 204


@pytest.fixture
def worker_here(tmp_path, tiny_checkpoint, monkeypatch):
    """The worker's training function in this process, on a SQLite database and storage of the test's own."""
    from service import db
    from service.migrate import upgrade
    from service.settings import get_settings
    import worker.tasks as worker_tasks

    for name, value in base_env(tmp_path / "data", tiny_checkpoint,
                                UPT_DATABASE_URL=f"sqlite:///{tmp_path / 'upt.sqlite'}").items():
        if name.startswith("UPT_"):
            monkeypatch.setenv(name, value)
    for cached in (get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()
    upgrade(get_settings())
    monkeypatch.setattr(worker_tasks, "_backbone", None)
    yield get_settings()
    db.get_engine().dispose()
    for cached in (get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()


def add_queued_task(with_images: bool = True, **values) -> str:
    from service import db
    from service.models import Task, Tenant, utcnow
    from service.settings import get_settings
    from service.storage import Storage
    from upt.training import TrainConfig

    config = TrainConfig(method="coop", shots=1, epochs=1, batch_size=2)
    config.class_names = CLASSES[:2]
    with db.session_scope() as session:
        tenant = session.query(Tenant).filter_by(name="t").one_or_none() or Tenant(name="t")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, status="queued", method="coop", config=config.to_dict(),
                    class_names=CLASSES[:2], num_images=4, model="upt-tiny", pretrained="upt-tiny.pt",
                    enqueued_at=utcnow(), **values)
        session.add(task)
        session.flush()
        task_id = task.id
    storage = Storage.from_settings(get_settings())
    if with_images:
        for index, name in enumerate(CLASSES[:2]):
            folder = storage.data_dir(task_id) / storage.class_folders(2)[index]
            folder.mkdir(parents=True)
            for _, path in [i for i in images("train", 2) if i[0] == name]:
                shutil.copy(path, folder / path.name)
    else:
        storage.task_dir(task_id).mkdir(parents=True)
    return task_id


def task_row(task_id: str):
    from service import db
    from service.models import Task

    with db.session_scope() as session:
        return session.get(Task, task_id)


def test_a_failed_tasks_error_names_no_server_path(worker_here, tmp_path):
    from worker.tasks import run_task

    task_id = add_queued_task(with_images=False)  # its images are gone: the training cannot start
    run_task(task_id)
    task = task_row(task_id)
    assert task.status == "failed" and task.error, task.error
    assert str(tmp_path) not in task.error and "/storage/" not in task.error, task.error


def test_a_worker_refuses_a_task_made_for_another_backbone_and_says_so(worker_here):
    from worker.tasks import run_task

    task_id = add_queued_task(weights_sha256="0" * 64)
    run_task(task_id)
    task = task_row(task_id)
    assert task.status == "failed" and "refused" in task.error and "upt-tiny" in task.error, task.error
    assert not (Path(worker_here.storage_dir) / "tasks" / task_id / "artifact").exists()
    from worker.tasks import get_backbone

    same = add_queued_task()  # a task of before the check (no weights recorded) is trained
    other = add_queued_task(weights_sha256=get_backbone().weights_sha256)
    for accepted in (same, other):
        run_task(accepted)
        assert task_row(accepted).status == "succeeded", task_row(accepted).error
