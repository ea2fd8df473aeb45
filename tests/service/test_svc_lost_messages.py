"""A queued task's message is re-sent only when it is really lost (issue 7): not while it waits in the
broker's queue or a worker has just taken it, but when the broker lost it (emptied, restarted) or a
worker took it long ago and died before claiming the task. Real Redis, and the filesystem broker of
local mode, with recovery in this process on SQLite; and the API stack's own sweeper on PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
import redis as redis_lib

from service import recovery
from service.db import Database, db_now
from service.models import Task, Tenant
from svc_helpers import REDIS_DB, RecordingQueue, task_form

pytestmark = pytest.mark.service


sessions: Database = None  # type: ignore[assignment]  # this test's database, set by the `queue` fixture


@pytest.fixture
def queue(sqlite_sessions, monkeypatch):
    monkeypatch.setitem(globals(), "sessions", sqlite_sessions)
    return RecordingQueue()  # records what recovery sends instead of publishing it


def queued_for_long(settings) -> str:
    """A queued task whose message was sent longer ago than UPT_REQUEUE_AFTER_S."""
    with sessions.scope() as session:
        tenant = session.query(Tenant).filter_by(name="t").one_or_none() or Tenant(name="t")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, status="queued", method="coop", config={"method": "coop"},
                    class_names=["a", "b"], num_images=2, model="upt-tiny", pretrained="x",
                    enqueued_at=db_now(session) - timedelta(seconds=settings.requeue_after_s + 5))
        session.add(task)
        session.flush()
        return task.id


def send(settings, task_id: str) -> None:
    """The training message, as the API sends it, to `settings`' broker and queue."""
    from service.queue import TRAIN_TASK, ensure_broker_folder, make_celery

    ensure_broker_folder(settings)
    app = make_celery(settings)
    try:
        app.send_task(TRAIN_TASK, args=[task_id])
    finally:
        app.close()


@pytest.fixture
def redis_broker(sqlite_database):
    settings = sqlite_database.model_copy(update={
        "broker_url": f"redis://127.0.0.1:6379/{REDIS_DB}", "queue": f"upt-lost-{uuid.uuid4().hex[:8]}"})
    client = redis_lib.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    yield settings, client
    client.delete(settings.queue)
    for tag, entry in client.hgetall("unacked").items():  # what this test's "worker" left taken
        if json.loads(entry)[2] == settings.queue:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.close()


def take_as_a_worker(settings) -> None:
    """What a worker does with a message before it claims the task: take it, unacknowledged."""
    from service.queue import make_celery

    app = make_celery(settings)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get(settings.queue)
        assert message is not None
        channel.qos._delivered.clear()  # a worker killed now: nothing restores it on close
    app.close()


def test_a_message_waiting_in_redis_is_not_sent_again_and_a_lost_one_is(redis_broker, queue):
    settings, client = redis_broker
    waiting, lost = queued_for_long(settings), queued_for_long(settings)
    send(settings, waiting)
    send(settings, lost)
    client.delete(settings.queue)  # Redis restarted empty...
    send(settings, waiting)  # ...and one of them was sent again since
    assert recovery.requeue_lost_messages(settings, sessions, queue) == [lost]
    assert queue.sent == [lost]
    assert client.llen(settings.queue) == 1  # no duplicate for the waiting one


def test_a_message_a_worker_has_just_taken_is_not_sent_again_one_taken_long_ago_is(redis_broker, queue):
    settings, client = redis_broker
    task_id = queued_for_long(settings)
    send(settings, task_id)
    take_as_a_worker(settings)
    assert client.llen(settings.queue) == 0 and client.hlen("unacked") >= 1
    assert recovery.requeue_lost_messages(settings, sessions, queue) == []  # the worker is about to claim it
    # The worker died before claiming: its delivery is older than UPT_REQUEUE_AFTER_S.
    long_ago = time.time() - settings.requeue_after_s - 5
    for tag, _ in client.zrange("unacked_index", 0, -1, withscores=True):
        client.zadd("unacked_index", {tag: long_ago})
    with sessions.scope() as session:  # and the row's last look is that old too
        session.query(Task).filter_by(id=task_id).update(
            {"enqueued_at": db_now(session) - timedelta(seconds=settings.requeue_after_s + 5)})
    assert recovery.requeue_lost_messages(settings, sessions, queue) == [task_id]


def test_the_filesystem_broker_of_local_mode_is_looked_into(sqlite_database, queue):
    settings = sqlite_database
    assert settings.resolved_broker_url.startswith("filesystem")
    waiting, lost = queued_for_long(settings), queued_for_long(settings)
    send(settings, waiting)
    assert recovery.requeue_lost_messages(settings, sessions, queue) == [lost]
    assert len(list(settings.broker_folder.glob(f"*.{settings.queue}.msg"))) == 1


@pytest.mark.slow
def test_a_backlog_waiting_for_a_worker_gets_no_duplicates(stack, redis_client):
    """Against the real API and its sweeper (UPT_REQUEUE_AFTER_S=3 there): with no worker up for three
    periods, each queued task still has exactly one message."""
    from service.queued_messages import _task_id

    client = stack.client(stack.new_tenant("backlog"))
    ids = []
    for seed in (1, 2):
        data, files = task_form(per_class=1, shots=1, epochs=1, seed=seed)
        ids.append(client.post("/tasks", data=data, files=files).json()["id"])
    time.sleep(3 * float(stack.env["UPT_REQUEUE_AFTER_S"]) + 2 * float(stack.env["UPT_SWEEP_INTERVAL_S"]))
    queued = [_task_id(json.loads(raw)) for raw in redis_client.lrange(stack.env["UPT_QUEUE"], 0, -1)]
    assert sorted(task_id for task_id in queued if task_id in ids) == sorted(ids)
    assert all(client.get(f"/tasks/{task_id}").json()["status"] == "queued" for task_id in ids)
    for task_id in ids:
        client.delete(f"/tasks/{task_id}")
