"""Recovery decisions on the database alone: bounded retries, cancellation of orphans, and the
Celery settings that make redelivery safe. (The end-to-end behaviour is in test_svc_recovery.py.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest

from service import recovery, task_state
from service.db import Database
from service.models import Task, Tenant, utcnow
from service.settings import Settings
from svc_helpers import RecordingQueue


sessions: Database = None  # type: ignore[assignment]  # this test's database, set by the `database` fixture


@pytest.fixture
def database(sqlite_database, sqlite_sessions, monkeypatch):
    monkeypatch.setitem(globals(), "sessions", sqlite_sessions)
    return sqlite_database, RecordingQueue()  # records instead of publishing


def add_task(status: str, attempts: int, heartbeat_age_s: float, enqueued_age_s: float = 0,
             worker: str | None = None) -> str:
    now = utcnow()
    with sessions.scope() as session:
        tenant = session.query(Tenant).filter_by(name="t").one_or_none() or Tenant(name="t")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, status=status, method="coop", config={"method": "coop"},
                    class_names=["a", "b"], num_images=2, model="upt-tiny", pretrained="x", attempts=attempts,
                    lease="l" if status != "queued" else None, heartbeat_at=now - timedelta(seconds=heartbeat_age_s),
                    enqueued_at=now - timedelta(seconds=enqueued_age_s), worker=worker)
        session.add(task)
        session.flush()
        return task.id


def status_of(task_id: str) -> Task:
    with sessions.scope() as session:
        return session.get(Task, task_id)


def test_dead_worker_is_retried_then_failed_never_left_running(database):
    settings, queue = database
    fresh = add_task("running", attempts=1, heartbeat_age_s=1)
    retry = add_task("running", attempts=1, heartbeat_age_s=settings.heartbeat_timeout_s + 5)
    spent = add_task("running", attempts=settings.max_attempts, heartbeat_age_s=settings.heartbeat_timeout_s + 5)
    orphan = add_task("cancelling", attempts=1, heartbeat_age_s=settings.heartbeat_timeout_s + 5)
    recovery.recover_dead_workers(settings, sessions, queue)
    assert status_of(fresh).status == "running"  # still heart-beating: left alone
    assert status_of(retry).status == "queued" and status_of(retry).lease is None
    failed = status_of(spent)
    assert failed.status == "failed" and "UPT_MAX_ATTEMPTS" in failed.error and failed.finished_at
    assert status_of(orphan).status == "cancelled"
    assert queue.sent == [retry]


def test_lost_messages_are_sent_again_once_per_period(database):
    settings, queue = database
    recent = add_task("queued", attempts=0, heartbeat_age_s=0, enqueued_age_s=1)
    lost = add_task("queued", attempts=0, heartbeat_age_s=0, enqueued_age_s=settings.requeue_after_s + 5)
    recovery.requeue_lost_messages(settings, sessions, queue)
    recovery.requeue_lost_messages(settings, sessions, queue)  # a second sweeper right after: nothing more to send
    assert queue.sent == [lost]
    assert recent not in queue.sent


def test_celery_redelivery_settings():
    from service.queue import make_celery

    settings = Settings(broker_url="redis://127.0.0.1:6379/0", task_time_limit_s=3600)
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit == 3600


def test_a_gone_worker_process_on_this_host_is_not_waited_for(database):
    settings, queue = database
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = socket.gethostname()
    gone = add_task("running", attempts=1, heartbeat_age_s=0, worker=f"{host}:{finished.pid}")
    alive = add_task("running", attempts=1, heartbeat_age_s=0, worker=f"{host}:{os.getpid()}")
    elsewhere = add_task("running", attempts=1, heartbeat_age_s=0, worker=f"other-{host}:{finished.pid}")
    recovery.recover_dead_workers(settings, sessions, queue)
    assert status_of(gone).status == "queued" and queue.sent == [gone]
    assert status_of(alive).status == status_of(elsewhere).status == "running"


def test_a_worker_that_beats_during_the_sweep_keeps_its_task(database, monkeypatch):
    """The heartbeat is part of the compare-and-set: one written between the sweeper's read and its
    update means the worker is alive, so its task is not handed to another worker."""
    settings, queue = database
    task_id = add_task("running", attempts=1, heartbeat_age_s=settings.heartbeat_timeout_s + 5)
    decide = task_state._after_worker_loss

    def beat_meanwhile(task, settings, now):
        with sessions.scope() as session:  # the worker's heartbeat thread, on another connection
            session.query(Task).filter_by(id=task.id).update({"heartbeat_at": utcnow()})
        return decide(task, settings, now)

    monkeypatch.setattr(task_state, "_after_worker_loss", beat_meanwhile)
    recovery.recover_dead_workers(settings, sessions, queue)
    assert status_of(task_id).status == "running" and status_of(task_id).lease == "l"
    assert queue.sent == []
