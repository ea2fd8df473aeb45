"""A DELETE that PostgreSQL picks as the victim of a deadlock with a worker's write is run
again, not answered 503 "database unavailable" as though the database were down.

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

