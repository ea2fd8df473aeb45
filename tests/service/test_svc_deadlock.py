"""A DELETE that PostgreSQL picks as the victim of a deadlock with a worker's write is run
again, not answered 503 "database unavailable" as though the database were down; a worker's write
picked as the victim is run again too, and finds the task deleted.

Deleting a task locks its row, then its candidates' and events' rows (ON DELETE CASCADE). A worker's
epoch write locks its candidate's row, then inserts an event, whose foreign key waits for the task's
row: the opposite order. The CI once answered a DELETE of a running auto task with a 503 this way.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text

from svc_helpers import task_form

pytestmark = pytest.mark.service


def _waiting_on_a_lock(engine, what: str) -> bool:
    with engine.connect() as conn:
        return bool(conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query ILIKE :q"), {"q": f"%{what}%"}))


def test_a_delete_that_loses_a_deadlock_to_a_worker_is_run_again(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="auto", candidates="coop,vpt-shallow", epochs=2)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]  # no worker: candidates stay queued
    engine = create_engine(stack.env["UPT_DATABASE_URL"])
    answer = {}
    try:
        with engine.connect() as worker:  # what a worker's epoch write does, in two steps
            worker.execute(text("SET deadlock_timeout = '10s'"))  # so that the API's side detects it first
            worker.execute(text("UPDATE task_candidates SET epoch = 1 WHERE task_id = :t AND position = 0"),
                           {"t": task_id})
            deleting = threading.Thread(target=lambda: answer.update(response=client.delete(f"/tasks/{task_id}")))
            deleting.start()
            deadline = time.monotonic() + 30
            while not _waiting_on_a_lock(engine, "DELETE FROM tasks"):
                assert time.monotonic() < deadline, "the DELETE never waited on the candidate's lock"
                time.sleep(0.05)
            worker.execute(text("INSERT INTO task_events (task_id, kind, epoch, attempt, data, created_at) "
                                "VALUES (:t, 'epoch', 1, 1, '{}', now())"), {"t": task_id})
            worker.commit()
            deleting.join(60)
    finally:
        engine.dispose()
    response = answer["response"]
    assert response.status_code == 204, response.text
    assert client.get(f"/tasks/{task_id}").status_code == 404


def test_an_epoch_write_that_loses_a_deadlock_to_a_delete_is_run_again(stack, start_worker_process, monkeypatch):
    """The other side: PostgreSQL picks the worker's epoch write as the victim. The write runs again,
    finds the task deleted, and the candidate's lease is lost: no error escapes the training."""
    from service import task_state
    from service.db import Database
    from service.models import Task
    from service.settings import Settings
    from upt.auto import config_from_dict
    from upt.training import EpochReport
    from worker.tasks import CandidateLease, _candidate_callbacks

    client = stack.client("acme")
    data, files = task_form(per_class=4, method="auto", candidates="coop,vpt-shallow", epochs=2)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]  # no worker: candidates stay queued
    start_worker_process(Settings(database_url=stack.env["UPT_DATABASE_URL"]))
    database = Database(stack.env["UPT_DATABASE_URL"])
    engine = create_engine(stack.env["UPT_DATABASE_URL"])
    try:
        with database.scope() as session:
            claimed = task_state.claim_candidate(session, task_id, "coop", "test-worker")
            lease = CandidateLease(task_id, "coop", claimed.lease, claimed.attempts, 60.0)
            auto = config_from_dict(session.get(Task, task_id).config)
        answer, lock_task = {}, task_state._lock_task

        def lock_task_once_the_delete_waits(session, locked_id):
            """Between the epoch write's candidate UPDATE and its lock of the task row (the first time):
            the API's DELETE starts and waits on the candidate's row; this side detects the deadlock first."""
            monkeypatch.setattr(task_state, "_lock_task", lock_task)
            session.execute(text("SET LOCAL deadlock_timeout = '100ms'"))
            deleting = threading.Thread(target=lambda: answer.update(response=client.delete(f"/tasks/{task_id}")))
            deleting.start()
            answer["thread"] = deleting
            deadline = time.monotonic() + 30
            while not _waiting_on_a_lock(engine, "DELETE FROM tasks"):
                assert time.monotonic() < deadline, "the DELETE never waited on the candidate's lock"
                time.sleep(0.05)
            return lock_task(session, locked_id)

        monkeypatch.setattr(task_state, "_lock_task", lock_task_once_the_delete_waits)
        _candidate_callbacks(lease, auto).on_epoch_end(EpochReport(epoch=1, epochs=2, loss=0.5, accuracy=0.5,
                                                                   lr=1e-3, elapsed_s=1.0, eta_s=1.0, progress=0.5))
        answer["thread"].join(60)
    finally:
        engine.dispose()
        database.dispose()
    assert lease.stop_reason == "lost"
    assert answer["response"].status_code == 204, answer["response"].text
    assert client.get(f"/tasks/{task_id}").status_code == 404
