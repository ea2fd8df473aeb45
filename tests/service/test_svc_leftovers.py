"""Nothing is shown that should not be, nothing is left behind: server paths, the broker's control
folder, upload scratch and task folders of killed requests, duplicate messages, clocks, scrapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from service.models import TaskStatus, utcnow
from svc_helpers import CLASSES, ROOT, RecordingQueue, base_env, images, settings_of, skew_host_clock, task_form

TaskStatusNames = [s.value for s in TaskStatus]


def test_the_filesystem_broker_writes_nothing_in_the_working_directory(tmp_path, tiny_checkpoint):
    env = base_env(tmp_path / "data", tiny_checkpoint)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    send = ("from service.queue import TrainingQueue; from service.settings import Settings; "
            "assert TrainingQueue(Settings()).enqueue('0' * 32)")
    done = subprocess.run([sys.executable, "-c", send],
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
def worker_here(tmp_path, tiny_checkpoint, monkeypatch, start_worker_process):
    """The worker's training function in this process, on a SQLite database and storage of the test's own."""
    from service.migrate import upgrade
    import worker.tasks as worker_tasks

    settings = settings_of(base_env(tmp_path / "data", tiny_checkpoint,
                                    UPT_DATABASE_URL=f"sqlite:///{tmp_path / 'upt.sqlite'}"))
    upgrade(settings)
    start_worker_process(settings)
    monkeypatch.setattr(worker_tasks, "_backbone", None)
    return settings


def add_queued_task(with_images: bool = True, **values) -> str:
    """A queued task, written with the database and storage of the worker started in this process."""
    from service.models import Task, Tenant, utcnow
    from service.storage import Storage
    from upt.training import TrainConfig
    from worker.tasks import get_settings, session_scope

    config = TrainConfig.of(method="coop", shots=1, epochs=1, batch_size=2)
    config.class_names = CLASSES[:2]
    with session_scope() as session:
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
    from service.models import Task
    from worker.tasks import session_scope

    with session_scope() as session:
        return session.get(Task, task_id)


def test_a_failed_tasks_error_names_no_server_path(worker_here, tmp_path):
    from worker.tasks import run_task

    task_id = add_queued_task(with_images=False)  # its images are gone: the training cannot start
    run_task(task_id, RecordingQueue())
    task = task_row(task_id)
    assert task.status == "failed" and task.error, task.error
    assert str(tmp_path) not in task.error and "/storage/" not in task.error, task.error


def test_a_worker_refuses_a_task_made_for_another_backbone_and_says_so(worker_here):
    """A worker serving another backbone hands the task back, untrained, for another worker (a fleet
    being redeployed), with an event saying why; after UPT_MAX_ATTEMPTS hand-backs the task fails."""
    import worker.tasks as worker_tasks
    from worker.tasks import run_task

    queue = RecordingQueue()
    task_id = add_queued_task(weights_sha256="0" * 64)
    for refusal in range(1, worker_here.max_attempts + 1):
        run_task(task_id, queue)
        task = task_row(task_id)
        assert task.status == "queued" and task.attempts == 0 and task.error is None, (task.status, task.error)
        assert (queue.sent[-1], queue.countdowns[-1]) == (task_id, worker_tasks.HAND_BACK_DELAY_S)
        assert len(queue.sent) == refusal
        handbacks = [e for e in task_events(task_id) if e.kind == "handback"]
        assert len(handbacks) == refusal
        assert "handed the task back" in handbacks[-1].data["reason"] and "upt-tiny" in handbacks[-1].data["reason"]
        assert handbacks[-1].data["worker"] == worker_tasks.worker_name()
    run_task(task_id, queue)  # one refusal more than UPT_MAX_ATTEMPTS hand-backs
    task = task_row(task_id)
    assert task.status == "failed" and "refused" in task.error and "upt-tiny" in task.error, task.error
    assert len(queue.sent) == worker_here.max_attempts
    assert not (Path(worker_here.storage_dir) / "tasks" / task_id / "artifact").exists()
    from worker.tasks import get_backbone

    same = add_queued_task()  # a task of before the check (no weights recorded) is trained
    other = add_queued_task(weights_sha256=get_backbone().weights_sha256)
    for accepted in (same, other):
        run_task(accepted, RecordingQueue())
        assert task_row(accepted).status == "succeeded", task_row(accepted).error


def task_events(task_id: str):
    from service.models import TaskEvent
    from worker.tasks import session_scope

    with session_scope() as session:
        return list(session.query(TaskEvent).filter_by(task_id=task_id).order_by(TaskEvent.id))


def _age(folder: Path, seconds: float) -> None:
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def test_scratch_and_row_less_task_folders_of_killed_requests_are_swept(sqlite_database, sqlite_sessions,
                                                                         start_worker_process):
    from service import recovery
    from service.storage import Storage

    start_worker_process(sqlite_database)  # add_queued_task writes through it
    settings = sqlite_database.model_copy(update={"orphan_grace_s": 600})
    storage = Storage.from_settings(settings)
    row_task = add_queued_task(with_images=True)
    folders = {}
    for name, parent in (("old-scratch", "tmp/upload-old"), ("new-scratch", "tmp/upload-new"),
                         ("orphan", f"tasks/{'a' * 32}"), ("young-orphan", f"tasks/{'b' * 32}")):
        folder = storage.root / parent
        (folder / "data" / "00000").mkdir(parents=True)
        (folder / "data" / "00000" / "1.png").write_bytes(b"x" * 1000)
        folders[name] = folder
    for name in ("old-scratch", "orphan"):
        _age(folders[name], 3600)
    _age(storage.task_dir(row_task), 3600)  # old, but its task exists
    recovery.sweep(settings, sqlite_sessions, RecordingQueue())
    assert not folders["old-scratch"].exists() and not folders["orphan"].exists()
    assert folders["new-scratch"].exists() and folders["young-orphan"].exists()
    assert storage.data_dir(row_task).is_dir()


def test_heartbeats_are_judged_by_the_database_clock_not_each_hosts(worker_here, monkeypatch):
    from service import recovery
    import worker.tasks as worker_tasks

    task_id = add_queued_task()
    with monkeypatch.context() as clock:
        skew_host_clock(clock, -600)  # a worker host whose clock is late
        task = worker_tasks.claim(task_id)
        worker_tasks.Lease(task_id, task.lease, 1.0).beat()
    skew_host_clock(monkeypatch, 600)  # a sweeper's, early
    assert recovery.recover_dead_workers(worker_here, worker_tasks.current_process().database, RecordingQueue()) == []
    row = task_row(task_id)
    assert row.status == "running" and row.lease == task.lease


def test_metrics_scrape_reads_an_aggregate_not_every_succeeded_task(sqlite_sessions, monkeypatch):
    from sqlalchemy.orm import Session

    from service.prometheus import Metrics
    from service.models import Task, Tenant

    with sqlite_sessions.scope() as session:
        tenant = Tenant(name="m")
        session.add(tenant)
        session.flush()
        start = utcnow() - timedelta(hours=1)
        for index in range(300):
            session.add(Task(tenant_id=tenant.id, status="succeeded", method="coop", config={}, class_names=[],
                             num_images=1, model="m", pretrained="p", started_at=start,
                             finished_at=start + timedelta(seconds=20 if index % 3 else 100)))
    fetched: list[int] = []
    execute = Session.execute

    def counting(self, *args, **kwargs):
        frozen = execute(self, *args, **kwargs).freeze()
        fetched.append(len(frozen.data))
        return frozen()

    monkeypatch.setattr(Session, "execute", counting)
    text = Metrics(sqlite_sessions).render().body.decode()
    assert max(fetched) <= len(TaskStatusNames), fetched  # one row per status, one for the histogram
    assert metric(text, 'upt_training_duration_seconds_bucket{le="30"}') == 200
    assert metric(text, 'upt_training_duration_seconds_bucket{le="120"}') == 300
    assert metric(text, "upt_training_duration_seconds_count") == 300
    assert metric(text, "upt_training_duration_seconds_sum") == pytest.approx(14000, abs=0.1)


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.service
def test_metrics_training_durations_on_postgresql(stack):
    import psycopg

    client = stack.client("acme")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    task = client.post("/tasks", data=data, files=files).json()
    url = stack.env["UPT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    before = httpx.get(f"{stack.url}/metrics").text
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET status = 'succeeded', started_at = now() - interval '45 seconds', "
                     "finished_at = now() WHERE id = %s", (task["id"],))
    after = httpx.get(f"{stack.url}/metrics").text

    value = metric
    assert value(after, "upt_training_duration_seconds_count") == value(before, "upt_training_duration_seconds_count") + 1
    assert value(after, 'upt_training_duration_seconds_bucket{le="60"}') == \
        value(before, 'upt_training_duration_seconds_bucket{le="60"}') + 1
    assert value(after, 'upt_training_duration_seconds_bucket{le="30"}') == \
        value(before, 'upt_training_duration_seconds_bucket{le="30"}')
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
