"""Cheap polling: ETags, 304 Not Modified and Retry-After on GET /tasks/{id} and GET /tasks."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event, update

from svc_helpers import task_form, wait_for

pytestmark = pytest.mark.service


def test_304_on_an_unchanged_task_and_200_with_a_new_etag_after_progress(stack):
    client = stack.client("acme")
    # Enough epochs that a poll every 0.2 s sees the training in progress: on an idle machine three
    # epochs of the tiny model ran between two polls (queued, then succeeded, and nothing between).
    data, files = task_form(per_class=2, method="coop", shots=2, epochs=40, batch_size=4)
    task = client.post("/tasks", data=data, files=files).json()
    # The API builds the task's instant stage right after creating it, which changes the row (and its
    # ETag) once more: wait for that, so that nothing but a worker can change it below.
    deadline = time.monotonic() + 120
    while client.get(f"/tasks/{task['id']}").json()["stages"]["instant"]["state"] not in ("ready", "failed"):
        assert time.monotonic() < deadline, "the instant stage was not built"
        time.sleep(0.2)
    first = client.get(f"/tasks/{task['id']}")
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["retry-after"].isdigit()
    assert "no-cache" in first.headers["cache-control"]

    while True:  # unchanged until a worker takes it (none runs yet; the instant stage is built)
        again = client.get(f"/tasks/{task['id']}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", again.text
        assert again.headers["etag"] == etag and again.headers["retry-after"].isdigit()
        if client.get(f"/tasks/{task['id']}").json()["status"] == "queued":
            break
    listing = client.get("/tasks", params={"limit": 5})
    assert client.get("/tasks", params={"limit": 5},
                      headers={"If-None-Match": listing.headers["etag"]}).status_code == 304

    worker = stack.start_worker("polling-worker")
    try:
        deadline, seen = time.monotonic() + 240, [etag]
        while time.monotonic() < deadline:
            answer = client.get(f"/tasks/{task['id']}", headers={"If-None-Match": seen[-1]})
            if answer.status_code == 200:
                assert answer.headers["etag"] not in seen  # a change is a new tag, never an old one
                seen.append(answer.headers["etag"])
                if answer.json()["status"] in {"succeeded", "failed"}:
                    break
            else:
                assert answer.status_code == 304
            time.sleep(0.2)
        done = answer.json()
        assert done["status"] == "succeeded", worker.tail()
        assert len(seen) >= 3  # queued -> (running, progress...) -> succeeded
        assert "retry-after" not in answer.headers  # finished: nothing will change on its own
        final = client.get(f"/tasks/{task['id']}", headers={"If-None-Match": seen[-1]})
        assert final.status_code == 304 and "retry-after" not in final.headers
    finally:
        worker.stop()

    changed = client.get("/tasks", params={"limit": 5}, headers={"If-None-Match": listing.headers["etag"]})
    assert changed.status_code == 200 and changed.headers["etag"] != listing.headers["etag"]
    assert any(t["id"] == task["id"] and t["status"] == "succeeded" for t in changed.json()["items"])
    # Another tenant never gets a 304 for this task: it is not theirs.
    assert stack.client("globex").get(f"/tasks/{task['id']}", headers={"If-None-Match": seen[-1]}).status_code == 404


class Statements:
    """Every SQL statement the engine runs while counting."""

    def __init__(self, engine) -> None:
        self.engine, self.seen = engine, []

    def __enter__(self) -> "Statements":
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, *args) -> None:
        # The API's background sweeper (recovery.Sweeper) reads the database on its own schedule; on a
        # busy machine its first sweep can fall inside the counted request. Count the request's alone.
        if threading.current_thread().name != "upt-sweeper":
            self.seen.append(statement)


def test_a_304_reads_neither_events_nor_metrics_and_heartbeats_keep_the_tag(sqlite_database, sqlite_sessions):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key, get_or_create_tenant
    from service.models import Task, TaskEvent, liveness_only, utcnow

    with sqlite_sessions.scope() as session:
        key = create_key(session, "acme")
        tenant = get_or_create_tenant(session, "acme")
        session.add(Task(id="a" * 32, tenant_id=tenant.id, method="coop", config={}, class_names=["a", "b"],
                         num_images=2, model="m", pretrained="p", status="running", metrics={"x": 1},
                         heartbeat_at=utcnow()))  # alive: else the app's sweeper re-queues it between the GETs
        session.add(TaskEvent(task_id="a" * 32, kind="epoch", epoch=1, data={"epoch": 1}))
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(sqlite_database.model_copy(update={"preload_backbone": False}))) as client:
        etag = client.get("/tasks/" + "a" * 32, headers=headers).headers["etag"]
        with Statements(client.app.state.database.engine) as statements:
            answer = client.get("/tasks/" + "a" * 32, headers=dict(headers, **{"If-None-Match": etag}))
        assert answer.status_code == 304
        selects = [s for s in statements.seen if s.lstrip().upper().startswith("SELECT")]
        assert len(selects) == 2, selects  # the key's tenant, the task's version
        assert not any("task_events" in s or "metrics" in s or "config" in s for s in selects), selects

        with sqlite_sessions.scope() as session:  # a heartbeat changes nothing a client sees
            session.execute(update(Task).values(heartbeat_at=utcnow(), **liveness_only()))
        assert client.get("/tasks/" + "a" * 32, headers=dict(headers, **{"If-None-Match": etag})).status_code == 304
        with sqlite_sessions.scope() as session:  # progress does
            session.execute(update(Task).values(progress=0.5, heartbeat_at=utcnow()))
        moved = client.get("/tasks/" + "a" * 32, headers=dict(headers, **{"If-None-Match": etag}))
        assert moved.status_code == 200 and moved.headers["etag"] != etag and moved.json()["progress"] == 0.5
