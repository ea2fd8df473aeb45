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
    delete             any -> removed (with its          DELETE /tasks/{id}
                       candidates and events)

method=auto. The task stays one row; each of its candidates is a `task_candidates` row with a status,
lease and heartbeat of its own, trained by its own job (an `upt.train_candidate` message) on any free worker.
While candidates train, the task row is `running` with NO lease (the leases are the candidates'); the
task's heartbeat is the latest of its candidates' (cancelling -> cancelled by recovery still works when
every candidate worker is gone), and recovery leaves a lease-less auto task alone (`after_worker_loss`)
and judges its candidates one by one (`after_candidate_loss`). A candidate goes
queued -> running -> succeeded, or back to queued (its worker lost, a full disk, another backbone), or
failed (which fails the task) or cancelled. The job that finishes the LAST candidate takes the task's
lease with `take_auto_finish` (a compare-and-set: exactly one job can win, a redelivered message finds
nothing) and ends the task with `succeed`/`fail` as any single-method training does.
    add_queued            also adds the candidates, queued
    claim_candidate       candidate queued -> running (task queued -> running); fresh candidate lease
    candidate_heartbeat   candidate running, unchanged; answers the task's status (cancelling: stop)
    record_candidate_progress  candidate running: its fraction (and an epoch event); the task's
                          progress, epoch and ETA are recomputed over all candidates
    finish_candidate      candidate running -> succeeded, with its leaderboard row and a `candidate` event
    release_candidate     candidate running -> queued      worker (full disk, another backbone): re-sent later
    stop_candidate        candidate running -> cancelled   worker, having stopped for a cancel
    confirm_auto_cancel   task cancelling -> cancelled     once no candidate runs (lease-less task)
    fail_candidate        candidate -> failed, task running|cancelling -> failed
    take_auto_finish      task running|queued (no lease) -> running with a lease, once every candidate succeeded
    after_candidate_loss  candidate running -> queued | failed (and the task failed), by recovery
    renew_candidate_enqueued  candidate queued, unchanged: recovery re-sent its message

The lease rule. A row has a lease exactly while it is `running` or `cancelling` (but for a method=auto
task while its candidates train: they hold leases of their own, see below): `claim` writes a new
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
from service.models import ACTIVE_STATUSES, Task, TaskCandidate, TaskEvent, TaskStatus, liveness_only, new_task_id
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
    if task.method == AUTO:
        _add_candidates(session, task)
    return task


def _add_candidates(session: Session, task: Task) -> None:
    """method=auto: one queued row per candidate, with its epochs (its share of the task's progress)."""
    from upt.auto import config_from_dict

    task.id = task.id or new_task_id()
    configs = config_from_dict(task.config).configs()
    task.epochs = sum(config.total_epochs for config in configs)
    for position, config in enumerate(configs):
        session.add(TaskCandidate(task_id=task.id, position=position, method=config.method, status=QUEUED,
                                  attempts=0, epochs=config.total_epochs, epoch=0, fraction=0.0,
                                  enqueued_at=task.enqueued_at))


def cancel(session: Session, task_id: str) -> bool:
    """A queued task is cancelled at once; a running one becomes `cancelling` and its worker, told so
    by its next heartbeat, stops between two steps. False if the task was neither (it ended, or is
    already cancelling): a worker finishing at this instant is not overwritten."""
    if _set(session, Task.id == task_id, Task.status == QUEUED, status=CANCELLED, finished_at=db_now(session)):
        return True
    if not _set(session, Task.id == task_id, Task.status == RUNNING, status=CANCELLING):
        return False
    confirm_auto_cancel(session, task_id)  # method=auto with no candidate training right now: ends at once
    return True


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
    if seen.method == AUTO and seen.lease is None and seen.status == RUNNING:
        return None  # its candidates hold the leases: after_candidate_loss judges them one by one
    values = _after_worker_loss(seen, settings, db_now(session))
    lease = Task.lease.is_(None) if seen.lease is None else Task.lease == seen.lease
    beat = Task.heartbeat_at.is_(None) if seen.heartbeat_at is None else Task.heartbeat_at == seen.heartbeat_at
    if not _set(session, Task.id == seen.id, Task.status == seen.status, lease, beat, **values):
        return None
    return values["status"]


def _after_worker_loss(seen: Task, settings: Settings, now: datetime) -> dict[str, Any] | None:
    if seen.status == CANCELLING:
        return {"status": CANCELLED, "lease": None, "finished_at": now}
    if seen.attempts >= settings.max_attempts:
        return {"status": FAILED, "lease": None, "finished_at": now,
                "error": f"The worker stopped responding {seen.attempts} times (no heartbeat for "
                         f"{settings.heartbeat_timeout_s:.0f}s); giving up after UPT_MAX_ATTEMPTS="
                         f"{settings.max_attempts}."}
    return {"status": QUEUED, "lease": None, "enqueued_at": now}


# --- method=auto's candidates --------------------------------------------------------------------

AUTO = "auto"


def _candidate(task_id: str, method: str) -> tuple[ColumnElement[bool], ...]:
    return TaskCandidate.task_id == task_id, TaskCandidate.method == method


def _candidate_held(task_id: str, method: str, lease: str) -> tuple[ColumnElement[bool], ...]:
    return *_candidate(task_id, method), TaskCandidate.lease == lease, TaskCandidate.status == RUNNING


def _set_candidate(session: Session, *where: ColumnElement[bool], **values: Any) -> bool:
    return bool(session.execute(update(TaskCandidate).where(*where).values(**values)).rowcount)


def _lock_task(session: Session, task_id: str) -> Task | None:
    """The task row, locked until the commit: candidate transitions of one task (on several workers)
    recompute the task's progress one after another, each from every candidate's committed state."""
    return session.scalar(select(Task).where(Task.id == task_id).with_for_update()
                          .execution_options(populate_existing=True))


def delete(session: Session, task: Task) -> None:
    """Delete the task; ON DELETE CASCADE removes its candidates and events. Its candidates' rows are
    locked first, then the task's row: the order of a candidate's frequent writes (heartbeat, epoch,
    finish: the candidate's row, then the task's). Deleting the task row first took them the other
    way round, so a DELETE during two candidates' epochs deadlocked with them, and lost (a 503 after
    three tries) since it had waited longer. Rarer writes that lock the task first (claim, release,
    recovery) can still deadlock with it; `db.commit_retrying_conflicts` runs it again then."""
    session.execute(select(TaskCandidate.position).where(TaskCandidate.task_id == task.id)
                    .order_by(TaskCandidate.position).with_for_update())
    session.delete(task)


def candidates(session: Session, task_id: str) -> list[TaskCandidate]:
    return list(session.scalars(select(TaskCandidate).where(TaskCandidate.task_id == task_id)
                                .order_by(TaskCandidate.position).execution_options(populate_existing=True)))


def claim_candidate(session: Session, task_id: str, method: str, worker: str) -> TaskCandidate | None:
    """Candidate queued -> running with a fresh lease, attempts + 1; the task, if still queued, becomes
    running (its first candidate started). None if the candidate is not queued (trained, taken by
    another worker) or the task is not queued/running (cancelled, failed, deleted, being finished)."""
    now = db_now(session)
    _set(session, Task.id == task_id, Task.status == QUEUED, Task.lease.is_(None), status=RUNNING, worker=None,
         heartbeat_at=now, started_at=func.coalesce(Task.started_at, now), error=None)
    task = _lock_task(session, task_id)
    if task is None or task.status != RUNNING or task.lease is not None:
        return None
    if not _set_candidate(session, *_candidate(task_id, method), TaskCandidate.status == QUEUED,
                          status=RUNNING, lease=new_lease(), worker=worker, attempts=TaskCandidate.attempts + 1,
                          heartbeat_at=now, started_at=func.coalesce(TaskCandidate.started_at, now)):
        return None
    _show_candidates(session, task, now)
    return session.scalar(select(TaskCandidate).where(*_candidate(task_id, method))
                          .execution_options(populate_existing=True))


def candidate_heartbeat(session: Session, task_id: str, method: str, lease: str) -> str | None:
    """The candidate's worker is alive (the task's heartbeat too, version unchanged). Returns the task's
    status (`cancelling`: stop), or None once the candidate's lease is lost or the task ended."""
    now = db_now(session)
    if not _set_candidate(session, *_candidate_held(task_id, method, lease), heartbeat_at=now):
        return None
    return session.execute(update(Task).where(Task.id == task_id, Task.status.in_(_HELD))
                           .values(heartbeat_at=now, **liveness_only()).returning(Task.status)).scalar()


def record_candidate_progress(session: Session, task_id: str, method: str, lease: str, report: Progress,
                              fraction: float, epoch: int | None = None, event: dict | None = None) -> bool:
    """A candidate's progress (`fraction` of its own training; `epoch`: its epochs completed), and with
    `event` (its data) its epoch's event. The task's progress is the share of all candidates' epochs
    done, its ETA the time so far scaled to the rest: candidates training at once on several workers
    count together. The event is numbered by the task's epochs done after it, under the task row's
    lock: numbers grow in the order epochs are written, whichever candidate wrote them, so the event
    stream's cursor (the last number sent) skips none while candidates train at once."""
    now = db_now(session)
    values: dict[str, Any] = {"fraction": fraction, "heartbeat_at": now}
    if epoch is not None:
        values["epoch"] = epoch
    if not _set_candidate(session, *_candidate_held(task_id, method, lease), **values):
        return False
    task = _lock_task(session, task_id)
    if task is None or task.status not in _HELD:
        return False
    number = _show_candidates(session, task, now, loss=report.loss, accuracy=report.accuracy)
    if event is not None:
        attempt = session.scalar(select(TaskCandidate.attempts).where(*_candidate(task_id, method)))
        _put_event(session, task_id, "epoch", number, attempt or 1, event | {"epoch": number})
    return True


def finish_candidate(session: Session, task_id: str, method: str, lease: str, row: dict[str, Any]) -> bool:
    """Candidate running -> succeeded with its leaderboard row, and its `candidate` event (numbered by its
    position, `attempt` the candidate's). The caller moves the candidate's artifact into place before
    it commits (the UPDATE holds the candidate's row until then, as `succeed` does the task's)."""
    now = db_now(session)
    found = session.scalar(select(TaskCandidate).where(*_candidate_held(task_id, method, lease)))
    if found is None or not _set_candidate(session, *_candidate_held(task_id, method, lease), status=SUCCEEDED,
                                           lease=None, fraction=1.0, epoch=found.epochs, row=jsonable(row),
                                           finished_at=now, heartbeat_at=now):
        return False
    task = _lock_task(session, task_id)
    if task is None or task.status not in _HELD:
        return False
    _show_candidates(session, task, now)
    _put_event(session, task_id, "candidate", found.position, found.attempts, row | {"worker": found.worker})
    return True


def release_candidate(session: Session, task_id: str, method: str, lease: str, delay_s: float, reason: str,
                      counted: bool = True) -> bool:
    """Candidate running -> queued, to be claimed again in `delay_s` (a full disk; with counted=False
    another backbone's worker handing it back untrained). The task keeps running; `error` says why
    the candidate waits. False if the lease is lost or the task is cancelling (then stop_candidate)."""
    now = db_now(session)
    task = _lock_task(session, task_id)
    if task is None or task.status != RUNNING:
        return False
    attempts = TaskCandidate.attempts if counted else TaskCandidate.attempts - 1
    if not _set_candidate(session, *_candidate_held(task_id, method, lease), status=QUEUED, lease=None,
                          attempts=attempts, enqueued_at=now + timedelta(seconds=delay_s)):
        return False
    _show_candidates(session, task, now, error=reason)
    return True


def stop_candidate(session: Session, task_id: str, method: str, lease: str) -> bool:
    """Candidate running -> cancelled: its worker stopped for the task's cancel."""
    now = db_now(session)
    if not _set_candidate(session, *_candidate_held(task_id, method, lease), status=CANCELLED, lease=None,
                          finished_at=now):
        return False
    task = _lock_task(session, task_id)
    if task is not None and task.status in _HELD:
        _show_candidates(session, task, now)
    return True


def confirm_auto_cancel(session: Session, task_id: str) -> bool:
    """A cancelling auto task -> cancelled once none of its candidates runs. Called after the caller's
    stop_candidate committed, in a transaction of its own: of several candidates stopping at once,
    the last to commit sees every other one stopped."""
    still = select(TaskCandidate.position).where(TaskCandidate.task_id == task_id, TaskCandidate.status == RUNNING)
    return _set(session, Task.id == task_id, Task.status == CANCELLING, Task.lease.is_(None), ~still.exists(),
                status=CANCELLED, finished_at=db_now(session), eta_s=None)


def fail_candidate(session: Session, task_id: str, method: str, lease: str, error: str) -> bool:
    """A candidate failed: so does the task (its other candidates' workers stop at their next
    heartbeat). False if the candidate's lease is lost or the task already ended."""
    now = db_now(session)
    if not _set_candidate(session, *_candidate_held(task_id, method, lease), status=FAILED, lease=None,
                          finished_at=now):
        return False
    return _set(session, Task.id == task_id, Task.status.in_(_HELD), Task.lease.is_(None), status=FAILED,
                error=error, finished_at=now, eta_s=None)


def take_auto_finish(session: Session, task_id: str, worker: str) -> str | None:
    """Every candidate succeeded: the task takes a lease (-> running), for the caller to pick the winner
    and `succeed`. Called after the caller's finish_candidate committed, in a transaction of its own,
    so of two candidates finishing at once the later commit sees both done; the lease makes it one
    winner only. None if a candidate is not done, the task has a lease already, or it ended."""
    open_ = select(TaskCandidate.position).where(TaskCandidate.task_id == task_id, TaskCandidate.status != SUCCEEDED)
    lease, now = new_lease(), db_now(session)
    if not _set(session, Task.id == task_id, Task.method == AUTO, Task.status.in_((QUEUED, RUNNING)),
                Task.lease.is_(None), ~open_.exists(), status=RUNNING, lease=lease, worker=worker, heartbeat_at=now):
        return None
    return lease


def after_candidate_loss(session: Session, seen: TaskCandidate, settings: Settings) -> str | None:
    """The worker of candidate `seen` (as recovery read it: running, its heartbeat too old) is presumed
    dead: the candidate goes back to the queue (it resumes from its epoch checkpoint), or, tried
    UPT_MAX_ATTEMPTS times, fails with the task. Returns the candidate's new status, or None if it
    changed since it was read (its worker beat, finished) or the task is not running."""
    now = db_now(session)
    beat = TaskCandidate.heartbeat_at.is_(None) if seen.heartbeat_at is None \
        else TaskCandidate.heartbeat_at == seen.heartbeat_at
    task = _lock_task(session, seen.task_id)
    if task is None or task.status != RUNNING or task.lease is not None:
        return None
    where = (*_candidate_held(seen.task_id, seen.method, seen.lease or ""), beat)
    if seen.attempts >= settings.max_attempts:
        if not _set_candidate(session, *where, status=FAILED, lease=None, finished_at=now):
            return None
        _set(session, Task.id == seen.task_id, Task.status == RUNNING, Task.lease.is_(None), status=FAILED,
             finished_at=now, eta_s=None,
             error=f"The worker training candidate {seen.method} stopped responding {seen.attempts} times (no "
                   f"heartbeat for {settings.heartbeat_timeout_s:.0f}s); giving up after UPT_MAX_ATTEMPTS="
                   f"{settings.max_attempts}.")
        return FAILED
    if not _set_candidate(session, *where, status=QUEUED, lease=None, enqueued_at=now):
        return None
    _show_candidates(session, task, now)
    return QUEUED


def renew_candidate_enqueued(session: Session, seen: TaskCandidate) -> bool:
    """A queued candidate's message was re-sent by recovery: looked at again UPT_REQUEUE_AFTER_S from now."""
    same = TaskCandidate.enqueued_at.is_(None) if seen.enqueued_at is None \
        else TaskCandidate.enqueued_at == seen.enqueued_at
    return _set_candidate(session, *_candidate(seen.task_id, seen.method), TaskCandidate.status == QUEUED, same,
                          enqueued_at=db_now(session))


def _show_candidates(session: Session, task: Task, now: datetime, **values: Any) -> int:
    """The locked task row from its candidates: progress over all their epochs (a training-free
    candidate counts as one step when none has epochs), epochs done, an ETA, which candidates run on
    which worker and the finished ones' leaderboard rows (`metrics.auto`), attempts = the most any
    candidate took."""
    rows = candidates(session, task.id)
    weights = [row.epochs for row in rows] if any(row.epochs for row in rows) else [1] * len(rows)
    done = sum(row.fraction * weight for row, weight in zip(rows, weights))
    progress = min(done / max(sum(weights), 1), 1.0)
    started = task.started_at or now
    if started.tzinfo is None:
        started = started.replace(tzinfo=now.tzinfo)
    elapsed = max((now - started).total_seconds(), 0.0)
    running = [row for row in rows if row.status == RUNNING]
    auto = {"candidates": [row.method for row in rows],
            "running": [row.method for row in running],
            "queued": [row.method for row in rows if row.status == QUEUED],
            "workers": {row.method: row.worker for row in rows if row.worker},
            "finished": [row.row for row in rows if row.status == SUCCEEDED]}
    epochs_done = sum(row.epoch for row in rows)
    _set(session, Task.id == task.id, progress=progress, epoch=epochs_done,
         epochs=sum(row.epochs for row in rows), eta_s=elapsed / progress * (1 - progress) if progress > 0 else None,
         attempts=max(row.attempts for row in rows), metrics=jsonable({"auto": auto}), **values)
    return epochs_done


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
