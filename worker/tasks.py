"""The training task: claim the row, train with callbacks that report to the database, store the artifact.

A worker only trains a task it has claimed: `queued` -> `running` with a fresh lease. Every later
write names that lease, so once recovery hands the task to another worker (this one looked dead)
nothing this one does can touch the row again. The transitions and the lease rule are
service.task_state's; this module decides which one an outcome calls for.

`upt` (torch, open_clip) is imported inside the functions that train, not at the top: this module is
imported by Celery's parent process too, which only supervises the forked pool processes. Without
torch that parent holds about 70 MB and imports in under a second; with it, about 750 MB and
several seconds more (measured on the development machine). Each pool process imports it when it
preloads the backbone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import task_state
from service.db import Database, commit_retrying_conflicts
from service.quotas import folder_bytes
from service.errors import NO_SPACE, is_disk_full, shown_weights, without_paths
from service.models import Task, TaskStatus
from service.queue import TrainingQueue
from service.settings import Settings
from service.storage import Storage

log = logging.getLogger("upt.worker")
PROGRESS_EVERY_S = 1.0
_backbone = None
_backbone_lock = threading.Lock()


@dataclass(frozen=True)
class WorkerProcess:
    """The settings this worker started with and the database built from them, used by all its tasks
    (Celery calls a task by name, so they are the process's, set once at start)."""

    settings: Settings
    database: Database


_process: WorkerProcess | None = None


def start_process(settings: Settings) -> WorkerProcess:
    """Called once when the worker starts (worker.process.run_worker), before Celery forks its pool."""
    global _process
    _process = WorkerProcess(settings, Database.from_settings(settings))
    return _process


def current_process() -> WorkerProcess:
    if _process is None:
        raise RuntimeError("the worker process was not started with worker.tasks.start_process(settings)")
    return _process


def get_settings() -> Settings:
    return current_process().settings


def session_scope():
    """A session on the worker's database that commits on success and rolls back on error."""
    return current_process().database.scope()


def get_backbone():
    """The frozen backbone, loaded once per worker process."""
    global _backbone
    from upt.backbone import load_backbone

    with _backbone_lock:
        if _backbone is None:
            settings = get_settings()
            _backbone = load_backbone(settings.model, settings.pretrained, settings.device)
        return _backbone


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(task_id: str) -> Task | None:
    with session_scope() as session:
        return task_state.claim(session, task_id, worker_name())


class Lease:
    """Heartbeats for a claimed task, and the reason to stop, if any ("cancel" or "lost")."""

    def __init__(self, task_id: str, lease: str, interval_s: float) -> None:
        self.task_id, self.lease, self.interval_s = task_id, lease, interval_s
        self.stop_reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{task_id}", daemon=True)

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.beat()
            except Exception:
                log.exception("heartbeat for task %s failed; retrying", self.task_id)

    def beat(self) -> None:
        with session_scope() as session:
            status = self._heartbeat(session)
        if status is None:
            self.stop_reason = "lost"  # deleted, ended, or handed to another worker
        elif status == TaskStatus.cancelling.value:
            self.stop_reason = "cancel"

    def _heartbeat(self, session) -> str | None:
        return task_state.heartbeat(session, self.task_id, self.lease)

    def lost(self) -> None:
        """A write under this lease lost: the task is no longer this worker's."""
        self.stop_reason = "lost"


class CandidateLease(Lease):
    """Heartbeats for a claimed candidate of a method=auto task (its own lease, not the task's)."""

    def __init__(self, task_id: str, method: str, lease: str, attempts: int, interval_s: float) -> None:
        super().__init__(task_id, lease, interval_s)
        self.method, self.attempts = method, attempts

    def _heartbeat(self, session) -> str | None:
        return task_state.candidate_heartbeat(session, self.task_id, self.method, self.lease)


def _lease_callbacks(lease: Lease, record_progress: Callable[[Session, Any], object],
                     record_epoch: Callable[[Session, Any], bool]):
    """Training callbacks that report under `lease`: progress throttled to one write per
    PROGRESS_EVERY_S, every epoch's end (a write that loses means the lease is gone), and cancellation
    between steps. `record_progress` and `record_epoch` make the task_state call of the row they report to."""
    from upt.training import TrainCallbacks

    class LeaseCallbacks(TrainCallbacks):
        last_write = 0.0

        # A method=auto candidate's write locks its candidate's row, then the task's, in the order a
        # DELETE of the task takes them (task_state.delete). Writes of other candidates that lock
        # the two the other way round (a claim, a release) can still deadlock with it: the loser
        # runs again, and a write that then finds the task deleted has lost its lease.
        def on_step(self, report) -> None:
            if time.monotonic() - self.last_write < PROGRESS_EVERY_S:
                return
            self.last_write = time.monotonic()
            with session_scope() as session:
                commit_retrying_conflicts(session, lambda: record_progress(session, report))

        def on_epoch_end(self, report) -> None:
            self.last_write = time.monotonic()
            with session_scope() as session:
                if not commit_retrying_conflicts(session, lambda: record_epoch(session, report)):
                    lease.lost()

        def should_stop(self) -> bool:
            return lease.stop_reason is not None

    return LeaseCallbacks()


def _callbacks(lease: Lease, attempt: int):
    """Progress to the task row, one event per epoch."""
    return _lease_callbacks(
        lease,
        lambda session, report: task_state.record_progress(session, lease.task_id, lease.lease, report),
        lambda session, report: task_state.record_epoch(session, lease.task_id, lease.lease, attempt, report,
                                                        report.as_dict()))


def run_task(task_id: str, queue: TrainingQueue) -> None:
    """Train one task (the Celery task registered by worker.process); `queue` sends it again when it
    must be retried later (a full disk, another backbone's task)."""
    from upt.auto import AUTO
    from upt.training import TrainConfig, train

    with session_scope() as session:
        method = session.scalar(select(Task.method).where(Task.id == task_id))
    if method == AUTO:
        resume_auto(task_id, queue)
        return
    task = claim(task_id)
    if task is None:
        log.info("task %s is not queued (already taken, finished, cancelled or deleted); skipping", task_id)
        return
    settings = get_settings()
    storage = Storage.from_settings(settings)
    log.info("training task %s (attempt %d)", task_id, task.attempts)
    with Lease(task_id, task.lease, settings.heartbeat_interval_s) as lease:
        partial = storage.task_dir(task_id) / f"artifact.partial-{lease.lease}"
        try:
            config = TrainConfig.from_dict(task.config)
            backbone = get_backbone()
            _check_backbone(task, backbone, settings)
            class_folders = storage.task_class_folders(task_id, len(task.class_names))
            metrics = train(backbone, storage.data_dir(task_id), config, partial,
                            callbacks=_callbacks(lease, task.attempts),
                            checkpoint_dir=storage.checkpoint_dir(task_id), class_folders=class_folders).metrics
            _succeed(task_id, lease, storage, partial, metrics)
        except BaseException as error:  # noqa: BLE001 - every outcome must be written to the row
            shutil.rmtree(partial, ignore_errors=True)
            _record_failure(task_id, lease, storage, error, queue)
            if not isinstance(error, Exception):
                raise


class WrongBackbone(Exception):
    """The task was checked against, and is meant for, another backbone than this worker's."""

    def __init__(self, wanted: str, served: str) -> None:
        super().__init__(f"This task was created for the backbone {wanted}, but the worker that took it serves "
                         f"{served}.")
        self.wanted, self.served = wanted, served


def _check_backbone(task: Task, backbone, settings) -> None:
    if task.model == settings.model and task.weights_sha256 in (None, backbone.weights_sha256):
        return
    raise WrongBackbone(f"{task.model} ({task.pretrained})",
                        f"{settings.model} ({shown_weights(settings.pretrained, backbone.weights_sha256)})")


# A handed-back task waits this long before a worker may take it again: no tight loop between workers
# that all refuse it, and soon enough for one with the right backbone (a fleet being redeployed).
HAND_BACK_DELAY_S = 5.0


def _after_wrong_backbone(task_id: str, error: WrongBackbone, settings) -> tuple[float | None, str]:
    """A worker serving another backbone hands the task back for another worker, untrained, at most
    UPT_MAX_ATTEMPTS times; the next refusal fails it. Returns the delay before another worker may
    take it (None: fail now) and what the hand-back event, or the task's error, says."""
    with session_scope() as session:
        refused = task_state.hand_backs(session, task_id)
    if refused >= settings.max_attempts:
        log.error("task %s: %s; refused %d times before, failed", task_id, error, refused)
        return None, (f"{error} It refused to train it, as {refused} workers before (UPT_MAX_ATTEMPTS="
                      f"{settings.max_attempts}). Run workers with the API's UPT_MODEL and UPT_PRETRAINED, "
                      "then create the task again.")
    log.warning("task %s: %s; handed back for another worker (%d of %d)", task_id, error, refused + 1,
                settings.max_attempts)
    return HAND_BACK_DELAY_S, f"{error} It handed the task back, untrained, for a worker that serves {error.wanted}."


# --- method=auto: one job per candidate -------------------------------------------------------------
# Candidates train as separate Celery jobs (upt.train_candidate, sent as a group by POST /tasks), so
# that any free worker takes the next one and N workers train N candidates at once. They share one
# split: the seed and shots are in the task's stored config and the split is a function of those and
# the images. Each job claims its candidate in the database, trains it into its own folder and records
# its leaderboard row; the job that finishes the last one (a compare-and-set in the database, not a
# chord: no result backend, and a redelivered message cannot finish the task twice) picks the winner
# with upt.auto.pick_winner and publishes the winner's artifact.

def resume_auto(task_id: str, queue: TrainingQueue) -> None:
    """A plain training message for an auto task (recovery re-sending a queued one): send the messages
    of its queued candidates again, and finish it if every candidate is done."""
    with session_scope() as session:
        queued = [c.method for c in task_state.candidates(session, task_id) if c.status == TaskStatus.queued.value]
    if queued:
        queue.enqueue_candidates(task_id, queued)
    finish_auto_if_done(task_id, queue)


def run_candidate(task_id: str, method: str, queue: TrainingQueue) -> None:
    """Train one candidate of a method=auto task (the Celery task registered by worker.process);
    `queue` sends it again when it must wait (a full disk, another backbone's worker)."""
    from upt.artifact import annotate_artifact
    from upt.auto import candidate_config, config_from_dict, leaderboard_row
    from upt.training import train

    with session_scope() as session:
        claimed = task_state.claim_candidate(session, task_id, method, worker_name())
        task = session.get(Task, task_id) if claimed is not None else None
    if claimed is None or task is None:
        log.info("candidate %s of task %s is not queued (trained, taken, or the task ended); skipping", method, task_id)
        finish_auto_if_done(task_id, queue)  # the one that finished the last candidate may have died before
        return
    settings = get_settings()
    storage = Storage.from_settings(settings)
    work = storage.checkpoint_dir(task_id) / "candidates"
    log.info("training candidate %s of task %s (attempt %d)", method, task_id, claimed.attempts)
    with CandidateLease(task_id, method, claimed.lease, claimed.attempts, settings.heartbeat_interval_s) as lease:
        partial = work / f"{method}.partial-{lease.lease}"
        try:
            auto = config_from_dict(task.config)
            backbone = get_backbone()
            _check_backbone(task, backbone, settings)
            class_folders = storage.task_class_folders(task_id, len(task.class_names))
            started = time.monotonic()
            result = train(backbone, storage.data_dir(task_id), candidate_config(auto.base, method), partial,
                           callbacks=_candidate_callbacks(lease, auto), checkpoint_dir=work / f"{method}.checkpoint",
                           class_folders=class_folders)
            row = leaderboard_row(method, result.metrics, time.monotonic() - started).as_dict()
            annotate_artifact(partial, {"auto_candidate": row})
            finished = _finish_candidate(lease, storage, work, partial, row)
        except BaseException as error:  # noqa: BLE001 - every outcome must be written to the rows
            shutil.rmtree(partial, ignore_errors=True)
            _record_candidate_failure(lease, storage, error, queue)
            if not isinstance(error, Exception):
                raise
            return
    if finished:
        finish_auto_if_done(task_id, queue)


def _candidate_callbacks(lease: CandidateLease, auto):
    """A candidate's progress to its row (the task's is recomputed over all candidates), its epochs as
    events numbered across candidates in the order they are written (see
    task_state.record_candidate_progress), each naming the candidate, its own epoch and the worker."""
    total = sum(c.total_epochs for c in auto.configs())
    worker = worker_name()

    def record_progress(session: Session, report) -> None:
        task_state.record_candidate_progress(session, lease.task_id, lease.method, lease.lease, report, report.progress)

    def record_epoch(session: Session, report) -> bool:
        data = report.as_dict() | {"epochs": total, "candidate": lease.method, "candidate_epoch": report.epoch,
                                   "worker": worker}
        return task_state.record_candidate_progress(session, lease.task_id, lease.method, lease.lease,
                                                    report, report.progress, report.epoch, data)

    return _lease_callbacks(lease, record_progress, record_epoch)


def _finish_candidate(lease: CandidateLease, storage: Storage, work: Path, partial: Path, row: dict) -> bool:
    final = work / lease.method
    with session_scope() as session:
        # As in _succeed: the folder is moved into place inside the transaction that marks the candidate.
        done = task_state.finish_candidate(session, lease.task_id, lease.method, lease.lease, row)
        if done:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    if done:
        shutil.rmtree(work / f"{lease.method}.checkpoint", ignore_errors=True)
        log.info("task %s: candidate %s trained", lease.task_id, lease.method)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        _forget_if_deleted(lease.task_id, storage)
    return done


def finish_auto_if_done(task_id: str, queue: TrainingQueue) -> None:
    """If every candidate succeeded and no other job has, take the task's lease, pick the winner
    (upt.auto.pick_winner over the leaderboard rows, in candidate order) and publish its artifact
    with the choice recorded in it, as the CLI's `--method auto` does."""
    from upt.artifact import load_artifact
    from upt.auto import LeaderboardRow, pick_winner, record_choice
    from upt.errors import ConfigError

    with session_scope() as session:
        lease_id = task_state.take_auto_finish(session, task_id, worker_name())
    if lease_id is None:
        return
    settings = get_settings()
    storage = Storage.from_settings(settings)
    with Lease(task_id, lease_id, settings.heartbeat_interval_s) as lease:
        partial = storage.task_dir(task_id) / f"artifact.partial-{lease_id}"
        try:
            with session_scope() as session:
                board = [LeaderboardRow(**c.row) for c in task_state.candidates(session, task_id)]
            if len({row.val_count for row in board}) != 1:  # a guard on the one split, not expected to fire
                raise ConfigError("The candidates were validated on different images; they cannot be compared.")
            winner = pick_winner(board)
            source = storage.checkpoint_dir(task_id) / "candidates" / winner.method
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            choice = record_choice(partial, board, winner)
            metrics = load_artifact(source).config["metrics"] | {"auto": choice}
            log.info("task %s: %s won of %d candidates", task_id, winner.method, len(board))
            _succeed(task_id, lease, storage, partial, metrics)
        except BaseException as error:  # noqa: BLE001
            shutil.rmtree(partial, ignore_errors=True)
            _record_failure(task_id, lease, storage, error, queue)
            if not isinstance(error, Exception):
                raise


def _record_candidate_failure(lease: CandidateLease, storage: Storage, error: BaseException,
                              queue: TrainingQueue) -> None:
    """A candidate's outcome other than success: stopped for a cancel (the last one to stop ends the
    task cancelled), back to the queue after a full disk or on a worker of another backbone (at most
    UPT_MAX_ATTEMPTS tries), or failed, which fails the task."""
    from upt.errors import TrainingCancelled, UptError

    task_id, method = lease.task_id, lease.method
    if isinstance(error, TrainingCancelled) and lease.stop_reason == "lost":
        _forget_if_deleted(task_id, storage)
        return
    if not isinstance(error, Exception):  # worker shutdown: recovery gives the candidate to another worker
        return
    settings = get_settings()
    if isinstance(error, TrainingCancelled):
        _stop_candidate(lease, storage)
        return
    retry = isinstance(error, WrongBackbone) or is_disk_full(error)
    if retry and lease.attempts < settings.max_attempts:
        delay = HAND_BACK_DELAY_S if isinstance(error, WrongBackbone) else min(
            settings.disk_full_retry_s * 2 ** (lease.attempts - 1), settings.disk_full_retry_max_s)
        reason = NO_SPACE if not isinstance(error, WrongBackbone) else str(error)
        with session_scope() as session:
            released = task_state.release_candidate(
                session, task_id, method, lease.lease, delay,
                f"Candidate {method} waits {delay:.0f}s (try {lease.attempts} of {settings.max_attempts}): {reason}")
        if released:
            log.warning("task %s: candidate %s: %s; retrying in %.0fs", task_id, method, reason, delay)
            queue.enqueue_candidates(task_id, [method], countdown=delay)
        else:
            _stop_candidate(lease, storage)  # a cancel asked meanwhile wins over the retry
        return
    if isinstance(error, WrongBackbone) or is_disk_full(error):
        message = f"{NO_SPACE if is_disk_full(error) else error} (tried {lease.attempts} times, UPT_MAX_ATTEMPTS=" \
                  f"{settings.max_attempts})."
    elif isinstance(error, SoftTimeLimitExceeded):
        message = f"Training ran past the time limit (UPT_TASK_TIME_LIMIT_S={settings.task_time_limit_s})."
    elif isinstance(error, UptError):
        message = without_paths(str(error))
    else:
        log.exception("task %s: candidate %s failed unexpectedly", task_id, method)
        message = without_paths(f"Internal error in the worker: {type(error).__name__}: {error}")
    with session_scope() as session:
        failed = task_state.fail_candidate(session, task_id, method, lease.lease, f"Candidate {method}: {message}")
    if not failed:
        _forget_if_deleted(task_id, storage)


def _stop_candidate(lease: CandidateLease, storage: Storage) -> None:
    with session_scope() as session:
        task_state.stop_candidate(session, lease.task_id, lease.method, lease.lease)
    with session_scope() as session:  # a transaction of its own: see task_state.confirm_auto_cancel
        cancelled = task_state.confirm_auto_cancel(session, lease.task_id)
    if cancelled:
        storage.delete_checkpoints(lease.task_id)
        log.info("task %s cancelled", lease.task_id)


def _succeed(task_id: str, lease: Lease, storage: Storage, partial: Path, metrics: dict) -> None:
    final = storage.artifact_dir(task_id)
    with session_scope() as session:
        # The row is marked first and the artifact published inside the same transaction: the UPDATE
        # holds the row (PostgreSQL) or the database (SQLite) until the commit, so recovery cannot hand
        # the task to another worker between the lease check and the rename, and a worker that lost
        # its lease (presumed dead, but still running) never replaces the artifact of the one holding it.
        done = task_state.succeed(session, task_id, lease.lease, metrics, folder_bytes(partial))
        if done:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # atomic: readers see no artifact or a whole one
    if done:
        storage.delete_checkpoints(task_id)
        log.info("task %s succeeded", task_id)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        _forget_if_deleted(task_id, storage)


def _record_failure(task_id: str, lease: Lease, storage: Storage, error: BaseException,
                    queue: TrainingQueue) -> None:
    from upt.errors import TrainingCancelled, UptError

    if isinstance(error, TrainingCancelled) and lease.stop_reason == "lost":
        _forget_if_deleted(task_id, storage)
        return
    settings = get_settings()
    retry_in_s = None
    if isinstance(error, TrainingCancelled):
        message = None
    elif isinstance(error, Exception) and is_disk_full(error):
        retry_in_s, message = _after_disk_full(task_id, settings)
    elif isinstance(error, WrongBackbone):
        retry_in_s, message = _after_wrong_backbone(task_id, error, settings)
    elif isinstance(error, SoftTimeLimitExceeded):
        message = f"Training ran past the time limit (UPT_TASK_TIME_LIMIT_S={settings.task_time_limit_s})."
    elif isinstance(error, UptError):
        message = without_paths(str(error))
    elif isinstance(error, Exception):
        log.exception("task %s failed unexpectedly", task_id)
        message = without_paths(f"Internal error in the worker: {type(error).__name__}: {error}")
    else:  # worker shutdown (SystemExit, KeyboardInterrupt): leave the row for recovery to retry
        return
    retried = cancelled = failed = False
    with session_scope() as session:
        if message is None:
            cancelled = task_state.confirm_cancel(session, task_id, lease.lease)
        elif retry_in_s is not None:
            if isinstance(error, WrongBackbone):
                retried = task_state.hand_back(session, task_id, lease.lease, worker_name(), message, retry_in_s)
            else:
                retried = task_state.retry_later(session, task_id, lease.lease, retry_in_s, message)
            # A cancel asked meanwhile wins over the retry.
            cancelled = not retried and task_state.confirm_cancel(session, task_id, lease.lease)
        else:
            failed = task_state.fail(session, task_id, lease.lease, message)
    if cancelled:
        storage.delete_checkpoints(task_id)
    if retried:
        queue.enqueue(task_id, countdown=retry_in_s)
    if not (retried or cancelled or failed):
        _forget_if_deleted(task_id, storage)


def _after_disk_full(task_id: str, settings) -> tuple[float | None, str]:
    """A full storage volume is usually temporary (an operator frees space, another training ends): the
    task goes back to the queue after a back-off that doubles with each try, and fails only after
    UPT_MAX_ATTEMPTS tries. Its epoch checkpoints stay, so a retry resumes where the disk filled up.
    Returns the delay before the retry (None: fail now) and what the task's error says."""
    with session_scope() as session:
        attempts = session.scalar(select(Task.attempts).where(Task.id == task_id)) or 1
    if attempts >= settings.max_attempts:
        log.error("task %s: %s; giving up after %d tries", task_id, NO_SPACE, attempts)
        return None, (f"Training stopped: {NO_SPACE} ({attempts} tries, UPT_MAX_ATTEMPTS="
                      f"{settings.max_attempts}). Free space on the volume and create the task again.")
    delay = min(settings.disk_full_retry_s * 2 ** (attempts - 1), settings.disk_full_retry_max_s)
    log.error("task %s: %s; retrying in %.0fs (try %d of %d)", task_id, NO_SPACE, delay, attempts,
              settings.max_attempts)
    return delay, (f"Training paused: {NO_SPACE}. Retrying in {delay:.0f}s (try {attempts} of "
                   f"{settings.max_attempts}).")


def _forget_if_deleted(task_id: str, storage: Storage) -> None:
    """The row is gone (deleted while training): remove whatever this worker wrote since."""
    with session_scope() as session:
        if session.get(Task, task_id) is None:
            storage.delete_task(task_id)

