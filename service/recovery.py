"""Finding work the broker lost or a dead worker dropped, from the database (the source of truth).

- A `queued` task whose message was last sent or seen more than UPT_REQUEUE_AFTER_S ago is looked
  for in the broker (service.queued_messages) and sent again only if it is not there: the broker may
  have restarted empty, or a worker died holding it. A message still waiting is left alone, so a deep
  backlog does not fill with duplicates; a duplicate all the same (a message taken at the instant of
  the look, or a broker that cannot be looked into) is harmless: a worker claims a task only while it
  is `queued`, so a second message for the same task finds nothing to do.
- A `running` task whose heartbeat is older than UPT_HEARTBEAT_TIMEOUT_S (or whose worker process
  on this host is gone) lost its worker: it goes
  back to `queued` (training resumes from its last epoch checkpoint), or to `failed` once it has been
  tried UPT_MAX_ATTEMPTS times. A `cancelling` task in that state becomes `cancelled`.
Each change is a compare-and-set on the row (service.task_state), so any number of sweepers can run at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from service.db import Database, db_now
from service.errors import database_outage
from service import task_state
from service.models import Task, TaskCandidate, TaskStatus, as_utc
from service.queue import TrainingQueue
from service.queued_messages import task_ids_in_broker
from service.scratch import abandoned
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("upt.recovery")


def requeue_lost_messages(settings: Settings, database: Database, queue: TrainingQueue) -> list[str]:
    sent = []
    with database.scope() as session:
        cutoff = db_now(session) - timedelta(seconds=settings.requeue_after_s)
        rows = session.execute(
            select(Task.id, Task.enqueued_at).where(Task.status == TaskStatus.queued.value,
                                                    Task.enqueued_at < cutoff)
        ).all()
        # Looked into after the rows were read: a message a worker took since is in its hands, or its
        # task was claimed (then renew_enqueued loses).
        waiting = task_ids_in_broker(settings) if rows else set()
        for task_id, enqueued_at in rows:
            # Renewed either way: a message seen waiting is looked for again UPT_REQUEUE_AFTER_S later.
            renewed = task_state.renew_enqueued(session, task_id, enqueued_at)
            if renewed and (waiting is None or task_id not in waiting):
                sent.append(task_id)
    why = "the broker cannot be looked into" if waiting is None else "its message is in no queue nor worker"
    for task_id in sent:
        log.info("re-sending task %s: queued for over %.0fs and %s", task_id, settings.requeue_after_s, why)
        queue.enqueue(task_id)
    return sent


def dead_on_this_host(worker: str | None) -> bool:
    """True when `worker` (the "host:pid" a worker writes when it claims a task) ran here and its process is gone:
    no need to wait for the heartbeat timeout (a restarted `upt serve`, a pool process killed)."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def recover_dead_workers(settings: Settings, database: Database, queue: TrainingQueue) -> list[str]:
    requeued = []
    with database.scope() as session:
        cutoff = db_now(session) - timedelta(seconds=settings.heartbeat_timeout_s)
        active = session.scalars(
            select(Task).where(Task.status.in_([TaskStatus.running.value, TaskStatus.cancelling.value]))
        ).all()
        stale = [t for t in active if t.heartbeat_at is None or as_utc(t.heartbeat_at) < cutoff
                 or dead_on_this_host(t.worker)]
        for task in stale:
            status = task_state.after_worker_loss(session, task, settings)
            if status is not None:
                log.warning("task %s lost its worker (attempt %d): now %s", task.id, task.attempts, status)
                if status == TaskStatus.queued.value:
                    requeued.append(task.id)
    for task_id in requeued:
        queue.enqueue(task_id)
    return requeued


def recover_candidates(settings: Settings, database: Database, queue: TrainingQueue) -> list[tuple[str, str]]:
    """method=auto, while its candidates train (the task `running` without a lease): a candidate whose
    worker is gone goes back to the queue, a queued candidate whose message is older than
    UPT_REQUEUE_AFTER_S and not in the broker is re-sent, and a task whose every candidate succeeded but that nobody
    finished (the last candidate's worker died between the two commits) gets one message to finish
    it. Returns the (task, candidate) messages sent."""
    send: list[tuple[str, str]] = []
    stale: list[TaskCandidate] = []
    with database.scope() as session:
        now = db_now(session)
        beat_cutoff = now - timedelta(seconds=settings.heartbeat_timeout_s)
        queue_cutoff = now - timedelta(seconds=settings.requeue_after_s)
        rows = session.execute(select(TaskCandidate, Task.heartbeat_at).join(Task, Task.id == TaskCandidate.task_id)
                               .where(Task.status == TaskStatus.running.value, Task.lease.is_(None))
                               .order_by(TaskCandidate.task_id, TaskCandidate.position)).all()
        by_task: dict[str, list] = {}
        for candidate, task_beat in rows:
            by_task.setdefault(candidate.task_id, []).append((candidate, task_beat))
        for task_id, found in by_task.items():
            if all(c.status == TaskStatus.succeeded.value for c, _ in found):
                if found[0][1] is None or as_utc(found[0][1]) < beat_cutoff:
                    send.append((task_id, found[-1][0].method))
                continue
            for candidate, _ in found:
                if candidate.status == TaskStatus.running.value and (
                        candidate.heartbeat_at is None or as_utc(candidate.heartbeat_at) < beat_cutoff
                        or dead_on_this_host(candidate.worker)):
                    status = task_state.after_candidate_loss(session, candidate, settings)
                    if status is not None:
                        log.warning("task %s: candidate %s lost its worker (attempt %d): now %s", task_id,
                                    candidate.method, candidate.attempts, status)
                    if status == TaskStatus.queued.value:
                        send.append((task_id, candidate.method))
                elif candidate.status == TaskStatus.queued.value and candidate.enqueued_at is not None \
                        and as_utc(candidate.enqueued_at) < queue_cutoff:
                    stale.append(candidate)
        # As for a queued task: re-sent only when no message of its task waits in the broker (messages
        # name the task, not the candidate; a lost one is re-sent once the others were taken).
        waiting = task_ids_in_broker(settings) if stale else set()
        for candidate in stale:
            if task_state.renew_candidate_enqueued(session, candidate) and (
                    waiting is None or candidate.task_id not in waiting):
                send.append((candidate.task_id, candidate.method))
    for task_id, method in send:
        queue.enqueue_candidates(task_id, [method])
    return send


def _newest_mtime(folder: Path) -> float:
    """The latest change anywhere under `folder` (a request still writing into it keeps it young)."""
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:  # removed while we look
                pass
    return newest


def sweep_storage(settings: Settings, database: Database) -> list[Path]:
    """Remove what killed requests left: the upload scratch of processes that died (at once; a live
    one's never), and task folders with no row (a POST /tasks killed between writing its images and
    committing its row), once untouched for UPT_ORPHAN_GRACE_S."""
    storage = Storage.from_settings(settings)
    cutoff = time.time() - settings.orphan_grace_s
    # Scratch: only a dead process's (service.scratch), never a live request's, whoever sweeps.
    dead_scratch = abandoned(storage.root / "tmp", cutoff, _newest_mtime)
    tasks = storage.root / "tasks"
    candidates = {p.name: p for p in (tasks.iterdir() if tasks.is_dir() else ())
                  if p.is_dir() and p.name.isalnum() and p.stat().st_mtime < cutoff}
    with database.scope() as session:
        names = list(candidates)
        known = set()
        for start in range(0, len(names), 500):
            known.update(session.scalars(select(Task.id).where(Task.id.in_(names[start:start + 500]))))
    removed = []
    for folder in dead_scratch:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for folder in [p for name, p in candidates.items() if name not in known]:
        if _newest_mtime(folder) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.warning("removed %d folder(s) left by interrupted requests (untouched for %.0fs)", len(removed),
                    settings.orphan_grace_s)
    return removed


def sweep(settings: Settings, database: Database, queue: TrainingQueue, storage_too: bool = True) -> None:
    recover_dead_workers(settings, database, queue)
    recover_candidates(settings, database, queue)
    requeue_lost_messages(settings, database, queue)
    if storage_too:
        sweep_storage(settings, database)


class Sweeper(threading.Thread):
    """Runs `sweep` every UPT_SWEEP_INTERVAL_S in the background until stopped; tasks it takes back
    are sent again through `queue`. `chores` run after each sweep: work of the process that owns the
    sweeper (the API resumes instant stages left unbuilt), which this module need not know about."""

    def __init__(self, settings: Settings, database: Database, queue: TrainingQueue,
                 chores: Sequence[Callable[[], object]] = ()) -> None:
        super().__init__(name="upt-sweeper", daemon=True)
        self.settings, self.database, self.queue = settings, database, queue
        self.chores = tuple(chores)
        self.stopped = threading.Event()

    def run(self) -> None:
        # Storage is walked at start and then less often than the database is read.
        storage_every_s = max(self.settings.sweep_interval_s, min(self.settings.orphan_grace_s, 600.0))
        last_storage = float("-inf")
        while True:
            try:
                storage_too = time.monotonic() - last_storage >= storage_every_s
                sweep(self.settings, self.database, self.queue, storage_too)
                for chore in self.chores:
                    chore()
                if storage_too:
                    last_storage = time.monotonic()
                database_outage.recovered()
            except (OperationalError, InterfaceError) as error:  # one line per outage, not a traceback a sweep
                database_outage.failed(error)
            except Exception:  # a database hiccup must not end recovery for good
                log.exception("sweep failed; retrying in %.0fs", self.settings.sweep_interval_s)
            if self.stopped.wait(self.settings.sweep_interval_s):
                return

    def stop(self) -> None:
        self.stopped.set()
