"""Which tasks have a training message in the broker: recovery re-sends a queued task's message only
when it is really lost, so that a deep backlog does not fill with duplicates.

Where a message is, by transport (kombu's, as Celery uses them):
- Redis: in the queue's lists (one per priority step) until a worker takes it, then in the `unacked`
  hash until the task has run (acks_late). An unacked message taken more than UPT_REQUEUE_AFTER_S ago
  whose task is still `queued` was taken by a worker that died before claiming it (or one that held
  it for a countdown that has passed): kombu gives such a message back only after the visibility
  timeout (hours), so it counts as lost. Its delivery time is the taking worker's clock; the margin of
  UPT_REQUEUE_AFTER_S absorbs the usual disagreement between hosts.
- The filesystem transport (local mode, embedded worker): one file per message in the broker folder
  until a worker reads it.
- Any other transport: unknown (None); recovery then re-sends every UPT_REQUEUE_AFTER_S, as before.

A message a worker is taking at the instant of the look (between kombu's pop from the list and its
write to `unacked`, or between the filesystem transport's move and the claim) can be missed: it is
then sent twice, which is harmless (only a `queued` row is claimed), only no longer routine.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

from service.settings import Settings

log = logging.getLogger("upt.recovery")


def task_ids_in_broker(settings: Settings) -> set[str] | None:
    """The ids of the tasks whose message waits in the training queue or was just taken by a worker;
    None when this transport cannot be looked into, or the look failed."""
    url = settings.resolved_broker_url
    try:
        if url.startswith(("redis://", "rediss://")):
            raw = _redis_messages(url, settings.queue, settings.requeue_after_s)
        elif url.startswith("filesystem"):
            raw = _folder_messages(settings.broker_folder, settings.queue)
        else:
            return None
    except Exception as error:  # broker down: re-sending will tell (and fail) too
        log.warning("cannot look into the broker for waiting messages: %s: %s", type(error).__name__, error)
        return None
    return {task_id for task_id in map(_task_id, raw) if task_id is not None}


def _redis_messages(url: str, queue: str, fresh_s: float) -> list[dict]:
    import redis
    from kombu.transport.redis import Channel

    keys = [queue] + [f"{queue}{Channel.sep}{step}" for step in Channel.priority_steps if step]
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        # One transaction: a message moving from a list to `unacked` meanwhile is seen in one of them.
        with client.pipeline(transaction=True) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hgetall(Channel.unacked_key)
            pipe.zrange(Channel.unacked_index_key, 0, -1, withscores=True)
            *lists, unacked, taken_at = pipe.execute()
    finally:
        client.close()
    messages = [_json(item) for items in lists for item in items]
    recent = time.time() - fresh_s
    taken = {tag: when for tag, when in taken_at}
    for tag, entry in unacked.items():
        if taken.get(tag, 0.0) >= recent:
            held = _json(entry)  # [message, exchange, routing key]
            messages.append(held[0] if isinstance(held, list) and held else None)
    return [m for m in messages if isinstance(m, dict)]


def _folder_messages(folder: Path, queue: str) -> list[dict]:
    messages = []
    for path in _queue_files(folder, queue):
        try:
            messages.append(_json(path.read_bytes()))
        except FileNotFoundError:  # taken by a worker meanwhile
            pass
    return [m for m in messages if isinstance(m, dict)]


def _queue_files(folder: Path, queue: str) -> list[Path]:
    """kombu names a message file '<time>_<uuid>.<queue>.msg'."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.partition(".")[2] == f"{queue}.msg"]


def _json(raw) -> object:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def _task_id(message: dict) -> str | None:
    """The task id of a Celery (protocol 2) training message: its first positional argument. (The
    training task is the only one sent; another task's message, or a malformed one, gives None or an id
    no task row has.)"""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return args[0] if args and isinstance(args[0], str) else None
