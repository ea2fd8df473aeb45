"""Dependability: a worker killed mid-training, and a broker that lost its messages.

The database is the source of truth: recovery (run by every worker and API process) re-queues a
task whose worker stopped heart-beating, training resumes from the last epoch checkpoint, and a
queued task whose message vanished from Redis is sent again.
"""

from __future__ import annotations

import time

import pytest

from svc_helpers import task_form, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


def wait_for_epoch(client, task_id: str, epoch: int, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = client.get(f"/tasks/{task_id}/events").json()["items"]
        if len(events) >= epoch:
            return events
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not reach epoch {epoch}")


def test_killed_worker_resumes_from_checkpoint(stack):
    client = stack.client("acme")
    epochs = 12
    data, files = task_form(per_class=12, method="coop", shots=8, epochs=epochs, batch_size=4, seed=5)
    task = client.post("/tasks", data=data, files=files).json()
    first = stack.start_worker("worker-killed")
    try:
        before = wait_for_epoch(client, task["id"], 1)
        running = client.get(f"/tasks/{task['id']}").json()
        assert running["status"] == "running", running
    finally:
        first.kill_group()  # SIGKILL, pool children included: no chance to clean up
    assert running["epoch"] < epochs
    # Even with no worker up, the API's own sweep takes the task out of `running`.
    requeued = wait_for(client, task["id"], {"queued", "failed", "succeeded"}, timeout=30)
    assert requeued["status"] == "queued" and requeued["attempts"] == 1

    second = stack.start_worker("worker-resumed")
    try:
        done = wait_for(client, task["id"], {"succeeded", "failed"}, timeout=180)
    finally:
        second.stop()
    assert done["status"] == "succeeded", (done, second.tail())
    assert done["attempts"] == 2  # claimed once by each worker, succeeded once
    events = client.get(f"/tasks/{task['id']}/events").json()["items"]
    assert [e["epoch"] for e in events] == list(range(1, epochs + 1))
    # Epochs finished before the kill were not trained again: their records are untouched.
    kept = {e["epoch"]: e for e in events}
    for old in before:
        assert kept[old["epoch"]]["attempt"] == 1
        assert kept[old["epoch"]]["created_at"] == old["created_at"]
    assert kept[epochs]["attempt"] == 2
    client.delete(f"/tasks/{task['id']}")


def test_queued_tasks_survive_an_emptied_broker(stack, redis_client):
    client = stack.client("acme")
    ids = []
    for seed in (1, 2):
        data, files = task_form(per_class=3, method="coop", shots=1, epochs=1, seed=seed)
        ids.append(client.post("/tasks", data=data, files=files).json()["id"])
    assert redis_client.dbsize() > 0  # the messages are in Redis...
    redis_client.flushdb()  # ...until Redis restarts empty
    worker = stack.start_worker("worker-after-flush")
    try:
        finished = [wait_for(client, task_id, {"succeeded", "failed"}, timeout=90) for task_id in ids]
    finally:
        worker.stop()
    assert [t["status"] for t in finished] == ["succeeded", "succeeded"], worker.tail()
    assert all(t["attempts"] == 1 for t in finished)
    for task_id in ids:
        client.delete(f"/tasks/{task_id}")
