"""A DELETE of a task whose candidates are training takes its locks in the order of the
candidates' writes (the candidate's row, then the task's), so it waits for a worker's epoch write
instead of deadlocking with it.

It used to lock the task's row first, then (ON DELETE CASCADE) its candidates' and events' rows: the
opposite order from a worker's epoch write, which locks its candidate's row, then inserts an event,
whose foreign key waits for the task's row. The DELETE, having waited longer, was the deadlock's
victim: run again up to three times, then answered 503. The CI saw both, in
test_svc_auto.py::test_delete_of_a_running_auto_task_stops_its_candidates.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import create_engine, text

from svc_helpers import task_form

pytestmark = pytest.mark.service


def _the_delete_waits_on_a_lock(engine) -> bool:
    """The API's DELETE waits on a lock: on its candidates' rows (as it should), or, as it did, on
    the cascade from the task's row that it holds already."""
    with engine.connect() as conn:
        return bool(conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND (query ILIKE '%FROM task_candidates%FOR UPDATE%' "
                                     "OR query ILIKE 'DELETE FROM tasks%')")))


def test_a_delete_waits_for_a_workers_epoch_write_instead_of_deadlocking(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="auto", candidates="coop,vpt-shallow", epochs=2)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]  # no worker: candidates stay queued
    engine = create_engine(stack.env["UPT_DATABASE_URL"])
    answer = {}
    try:
        with engine.connect() as worker:  # what a worker's epoch write does, in two steps
            worker.execute(text("UPDATE task_candidates SET epoch = 1 WHERE task_id = :t AND position = 0"),
                           {"t": task_id})
            deleting = threading.Thread(target=lambda: answer.update(response=client.delete(f"/tasks/{task_id}")))
            deleting.start()
            deadline = time.monotonic() + 30
            while not _the_delete_waits_on_a_lock(engine):
                assert time.monotonic() < deadline, "the DELETE never waited on a lock"
                time.sleep(0.05)
            # Holding the task's row, the DELETE would make this wait until PostgreSQL broke the
            # deadlock (deadlock_timeout, 1 s); it must not wait at all.
            worker.execute(text("SET lock_timeout = '200ms'"))
            worker.execute(text("INSERT INTO task_events (task_id, kind, epoch, attempt, data, created_at) "
                                "VALUES (:t, 'epoch', 1, 1, '{}', now())"), {"t": task_id})
            worker.commit()
            deleting.join(60)
    finally:
        engine.dispose()
    response = answer["response"]
    assert response.status_code == 204, response.text
    assert client.get(f"/tasks/{task_id}").status_code == 404


def test_an_epoch_write_during_a_delete_goes_on_and_the_next_finds_the_task_deleted(
        stack, start_worker_process, monkeypatch):
    """The other side: an epoch write that has locked its candidate's row when the DELETE comes takes
    the task's row at once (the DELETE waits on the candidate's) and is committed; the DELETE then
    removes the task, and the worker's next write finds it gone: the candidate's lease is lost, and
    no error escapes the training."""
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
            the API's DELETE starts and waits on the candidate's row. Had the DELETE locked the task's
            row first, this lock would wait for it: the lock timeout makes that an error."""
            monkeypatch.setattr(task_state, "_lock_task", lock_task)
            session.execute(text("SET LOCAL lock_timeout = '200ms'"))
            deleting = threading.Thread(target=lambda: answer.update(response=client.delete(f"/tasks/{task_id}")))
            deleting.start()
            answer["thread"] = deleting
            deadline = time.monotonic() + 30
            while not _the_delete_waits_on_a_lock(engine):
                assert time.monotonic() < deadline, "the DELETE never waited on a lock"
                time.sleep(0.05)
            return lock_task(session, locked_id)

        monkeypatch.setattr(task_state, "_lock_task", lock_task_once_the_delete_waits)
        callbacks = _candidate_callbacks(lease, auto)
        callbacks.on_epoch_end(EpochReport(epoch=1, epochs=2, loss=0.5, accuracy=0.5, lr=1e-3, elapsed_s=1.0,
                                           eta_s=1.0, progress=0.5))
        assert lease.stop_reason is None  # written, before the DELETE
        answer["thread"].join(60)
        assert answer["response"].status_code == 204, answer["response"].text
        callbacks.on_epoch_end(EpochReport(epoch=2, epochs=2, loss=0.4, accuracy=0.6, lr=1e-3, elapsed_s=2.0,
                                           eta_s=0.0, progress=1.0))
    finally:
        engine.dispose()
        database.dispose()
    assert lease.stop_reason == "lost"
    assert client.get(f"/tasks/{task_id}").status_code == 404
