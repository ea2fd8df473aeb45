"""Task state: the one module that changes a task row's `status`, its lease and its progress.

States
    queued       waiting for a worker; its message is in the broker (recovery re-sends a lost one)
    running      a worker holds the lease and trains
    cancelling   a client asked to cancel a running task; its worker stops between two steps
    succeeded, failed, cancelled
                 final: nothing changes them again (DELETE /tasks/{id} removes the row)

Transitions (function: from -> to; who calls it)
    add_queued         new -> queued                     POST /tasks, once the images are stored
    claim              queued -> running                 worker, for a message; takes a fresh lease, attempts + 1
    heartbeat          running|cancelling, unchanged     worker's lease thread; answers whether to stop
    record_progress    running|cancelling, unchanged     worker, a few times a second within an epoch
    record_epoch       running|cancelling, unchanged     worker, at each epoch's end, with its event row
    record_metrics     running|cancelling, unchanged     worker (method=auto says which candidate runs)
    record_candidate   running|cancelling, unchanged     worker (method=auto finished a candidate)
    succeed            running|cancelling -> succeeded   worker; it publishes the artifact before committing
    fail               running|cancelling -> failed      worker
    confirm_cancel     running|cancelling -> cancelled   worker, having stopped for a cancel
    retry_later        running -> queued                 worker, after a full disk (re-sent after a delay)
    hand_back          running -> queued                 worker that serves another backbone than the task's
    cancel             queued -> cancelled,              POST /tasks/{id}/cancel
                       running -> cancelling
    renew_enqueued     queued, unchanged                 recovery, having re-sent a lost message or seen it queued
    after_worker_loss  running -> queued | failed,       recovery, when the heartbeat is older than
                       cancelling -> cancelled           UPT_HEARTBEAT_TIMEOUT_S or the worker's process is gone

The lease rule. A row has a lease exactly while it is `running` or `cancelling`: `claim` writes a new
one, and every transition out of those two states clears it. Every write by a worker names the lease
it was given (`WHERE lease = :lease`), so once recovery has handed the task to another worker, or the
row has ended or was deleted, nothing the first worker still does reaches the row; it learns so from
the function's answer and stops. Recovery takes the lease away only with the row exactly as it judged
it: same status, same lease, same heartbeat (a worker that beat meanwhile keeps its task).

Every function is one compare-and-set UPDATE (plus, for some, an event row in the same transaction)
and returns whether it won; the caller's session commits. Times are read from the database's clock
(`db_now`), never a host's: heartbeats and `enqueued_at` are judged by sweepers on other hosts.

Versions. Every UPDATE adds one to `version`, the ETag of GET /tasks/{id} and the cursor of the event
stream, except `heartbeat` and `renew_enqueued`: they write only `heartbeat_at` and `enqueued_at`,
which no response shows, so pollers keep getting 304 while a task waits or trains between two progress
reports (`liveness_only`). A heartbeat does not need a new version to be seen: nothing shows it.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, case, func, null, select, update
from sqlalchemy.orm import Session

from service.db import db_now
from service.models import ACTIVE_STATUSES, Task, TaskEvent, TaskStatus, liveness_only
from service.settings import Settings

QUEUED, RUNNING, CANCELLING = TaskStatus.queued.value, TaskStatus.running.value, TaskStatus.cancelling.value
SUCCEEDED, FAILED, CANCELLED = TaskStatus.succeeded.value, TaskStatus.failed.value, TaskStatus.cancelled.value
_HELD = (RUNNING, CANCELLING)
assert set(_HELD) == ACTIVE_STATUSES


class Progress(Protocol):
    """What a training report gives the row (upt.training.StepReport and EpochReport)."""

    progress: float
    epoch: int
    epochs: int
    loss: float
    accuracy: float
    eta_s: float | None


def _set(session: Session, *where: ColumnElement[bool], **values: Any) -> bool:
    """The compare-and-set: one UPDATE of the rows matching `where`; True if it changed one."""
    return bool(session.execute(update(Task).where(*where).values(**values)).rowcount)


def _held(task_id: str, lease: str) -> tuple[ColumnElement[bool], ...]:
    return Task.id == task_id, Task.lease == lease, Task.status.in_(_HELD)


# --- the API ----------------------------------------------------------------------------------------

def add_queued(session: Session, task: Task) -> Task:
    """A new task, `queued`. `enqueued_at` is the database's time: the sweeper judges it by that clock,
    so an API host whose clock is off makes its message look neither lost too soon nor never."""
    task.status = QUEUED
    task.enqueued_at = db_now(session)
    session.add(task)
    return task


def cancel(session: Session, task_id: str) -> bool:
    """A queued task is cancelled at once; a running one becomes `cancelling` and its worker, told so
    by its next heartbeat, stops between two steps. False if the task was neither (it ended, or is
    already cancelling): a worker finishing at this instant is not overwritten."""
    if _set(session, Task.id == task_id, Task.status == QUEUED, status=CANCELLED, finished_at=db_now(session)):
        return True
    return _set(session, Task.id == task_id, Task.status == RUNNING, status=CANCELLING)


# --- the worker -------------------------------------------------------------------------------------

def new_lease() -> str:
    return uuid.uuid4().hex


def claim(session: Session, task_id: str, worker: str) -> Task | None:
    """queued -> running with a fresh lease; None if the task is not queued (taken by another worker,
    ended, cancelled or deleted): a duplicate message finds nothing to do. `started_at` is the first
    claim's; `error` (a retry's reason) is cleared."""
    now = db_now(session)
    if not _set(session, Task.id == task_id, Task.status == QUEUED,
                status=RUNNING, lease=new_lease(), worker=worker, attempts=Task.attempts + 1, heartbeat_at=now,
                started_at=func.coalesce(Task.started_at, now), error=None):
        return None
    return session.get(Task, task_id, populate_existing=True)


def heartbeat(session: Session, task_id: str, lease: str) -> str | None:
    """The worker holding `lease` is alive: heartbeat_at = now, version unchanged (see the module's
    docstring). Returns the row's status (`cancelling` means: stop), or None once the lease is lost."""
    return session.execute(
        update(Task).where(*_held(task_id, lease))
        .values(heartbeat_at=db_now(session), **liveness_only()).returning(Task.status)
    ).scalar()


def record_progress(session: Session, task_id: str, lease: str, report: Progress) -> bool:
    """Progress within an epoch (shown: a new version); it is a heartbeat too."""
    return _set(session, *_held(task_id, lease), **_progress(report), heartbeat_at=db_now(session))


def record_epoch(session: Session, task_id: str, lease: str, attempt: int, report: Progress,
                 data: dict[str, Any]) -> bool:
    """An epoch's end: the row's progress and the epoch's event, together or not at all. An epoch
    trained again after a crash replaces its event (its `attempt` says so): the history never lists
    an epoch twice."""
    if not record_progress(session, task_id, lease, report):
        return False
    _put_event(session, task_id, "epoch", int(report.epoch), attempt, data)
    return True


def record_metrics(session: Session, task_id: str, lease: str, metrics: dict[str, Any]) -> bool:
    """The metrics shown while training (method=auto: the candidates and which one runs)."""
    return _set(session, *_held(task_id, lease), metrics=jsonable(metrics))


def record_candidate(session: Session, task_id: str, lease: str, index: int, attempt: int | None,
                     data: dict[str, Any]) -> bool:
    """method=auto finished candidate `index`. A result reused from an earlier attempt (attempt None)
    keeps the event of the attempt that made it."""
    if not _set(session, *_held(task_id, lease), heartbeat_at=db_now(session), **liveness_only()):
        return False
    if attempt is not None or _event(session, task_id, "candidate", index) is None:
        _put_event(session, task_id, "candidate", index, attempt or 1, data)
    return True


def succeed(session: Session, task_id: str, lease: str, metrics: dict[str, Any], stored_bytes: int) -> bool:
    """-> succeeded, adding the artifact's bytes to the task's. The caller publishes the artifact
    before it commits: the UPDATE holds the row (PostgreSQL) or the database (SQLite) until then, so
    recovery cannot hand the task to another worker between this check and the publication."""
    return _set(session, *_held(task_id, lease), status=SUCCEEDED, progress=1.0, metrics=jsonable(metrics),
                finished_at=db_now(session), eta_s=0.0, lease=None, stored_bytes=Task.stored_bytes + stored_bytes)


def fail(session: Session, task_id: str, lease: str, error: str) -> bool:
    return _set(session, *_held(task_id, lease), status=FAILED, error=error, finished_at=db_now(session),
                lease=None, eta_s=None)


def confirm_cancel(session: Session, task_id: str, lease: str) -> bool:
    """The worker stopped: -> cancelled (also from `running`: a retry or hand-back that lost to a cancel)."""
    return _set(session, *_held(task_id, lease), status=CANCELLED, finished_at=db_now(session), lease=None,
                eta_s=None)


def retry_later(session: Session, task_id: str, lease: str, delay_s: float, reason: str) -> bool:
    """running -> queued, to be claimed again in `delay_s` (the caller re-sends the message with that
    countdown; `enqueued_at` in the future keeps recovery from re-sending it earlier). `error` says
    why it waits. False if the lease is lost, or the task is `cancelling` (then `confirm_cancel`)."""
    return _set(session, Task.id == task_id, Task.lease == lease, Task.status == RUNNING, status=QUEUED,
                lease=None, eta_s=None, error=reason, enqueued_at=db_now(session) + timedelta(seconds=delay_s))


def hand_back(session: Session, task_id: str, lease: str, worker: str, reason: str, delay_s: float) -> bool:
    """running -> queued, untrained, for another worker: this one cannot train it (it serves another
    backbone). The claim does not count as an attempt (recovery's UPT_MAX_ATTEMPTS counts trainings
    lost with their worker), and a `handback` event, numbered from 1, says who refused it and why.
    False if the lease is lost, or the task is `cancelling` (then `confirm_cancel`)."""
    now = db_now(session)
    if not _set(session, Task.id == task_id, Task.lease == lease, Task.status == RUNNING, status=QUEUED,
                lease=None, eta_s=None, attempts=Task.attempts - 1, enqueued_at=now + timedelta(seconds=delay_s),
                started_at=case((Task.attempts <= 1, null()), else_=Task.started_at)):
        return False
    number = hand_backs(session, task_id) + 1
    session.add(TaskEvent(task_id=task_id, kind="handback", epoch=number, attempt=number,
                          data={"worker": worker, "reason": reason}, created_at=now))
    return True


def hand_backs(session: Session, task_id: str) -> int:
    """How many times workers handed the task back untrained."""
    return session.scalar(select(func.count()).select_from(TaskEvent)
                          .where(TaskEvent.task_id == task_id, TaskEvent.kind == "handback")) or 0


# --- recovery ---------------------------------------------------------------------------------------

def renew_enqueued(session: Session, task_id: str, enqueued_at: datetime | None) -> bool:
    """A queued task's message was just re-sent, or just seen waiting in the broker: recovery looks at
    it again UPT_REQUEUE_AFTER_S from now. False if the row changed since it was read (claimed,
    cancelled, re-sent by another sweeper). Version unchanged: `enqueued_at` is shown nowhere."""
    same = Task.enqueued_at.is_(None) if enqueued_at is None else Task.enqueued_at == enqueued_at
    return _set(session, Task.id == task_id, Task.status == QUEUED, same,
                enqueued_at=db_now(session), **liveness_only())


def after_worker_loss(session: Session, seen: Task, settings: Settings) -> str | None:
    """The worker of `seen` (the row as recovery read it: running or cancelling, its heartbeat too old)
    is presumed dead. A cancelling task becomes cancelled; a running one goes back to the queue
    (training resumes from its last epoch checkpoint), or fails once tried UPT_MAX_ATTEMPTS times.
    Returns the new status, or None if the row changed since it was read (the worker beat, ended, or
    the task was cancelled): then it is left alone."""
    values = _after_worker_loss(seen, settings, db_now(session))
    lease = Task.lease.is_(None) if seen.lease is None else Task.lease == seen.lease
    beat = Task.heartbeat_at.is_(None) if seen.heartbeat_at is None else Task.heartbeat_at == seen.heartbeat_at
    if not _set(session, Task.id == seen.id, Task.status == seen.status, lease, beat, **values):
        return None
    return values["status"]


def _after_worker_loss(seen: Task, settings: Settings, now: datetime) -> dict[str, Any]:
    if seen.status == CANCELLING:
        return {"status": CANCELLED, "lease": None, "finished_at": now}
    if seen.attempts >= settings.max_attempts:
        return {"status": FAILED, "lease": None, "finished_at": now,
                "error": f"The worker stopped responding {seen.attempts} times (no heartbeat for "
                         f"{settings.heartbeat_timeout_s:.0f}s); giving up after UPT_MAX_ATTEMPTS="
                         f"{settings.max_attempts}."}
    return {"status": QUEUED, "lease": None, "enqueued_at": now}


# --- helpers ----------------------------------------------------------------------------------------

def _progress(report: Progress) -> dict[str, Any]:
    return {"progress": report.progress, "epoch": report.epoch, "epochs": report.epochs, "loss": report.loss,
            "accuracy": report.accuracy, "eta_s": report.eta_s}


def _event(session: Session, task_id: str, kind: str, number: int) -> TaskEvent | None:
    return session.scalar(select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.kind == kind,
                                                  TaskEvent.epoch == number))


def _put_event(session: Session, task_id: str, kind: str, number: int, attempt: int, data: dict[str, Any]) -> None:
    """One row per (task, kind, number): written again, it is replaced."""
    data = jsonable(data)
    event = _event(session, task_id, kind, number)
    if event is None:
        session.add(TaskEvent(task_id=task_id, kind=kind, epoch=number, attempt=attempt, data=data,
                              created_at=db_now(session)))
    else:
        event.attempt, event.data, event.created_at = attempt, data, db_now(session)


def jsonable(value: Any) -> Any:
    """Plain JSON: PostgreSQL's json type refuses NaN and Infinity (a diverging training's loss), so
    they are stored as null, as SQLite-backed and PostgreSQL-backed services must agree."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return value
