"""The training task: claim the row, train with callbacks that report to the database, store the artifact.

A worker only trains a task it has claimed: `queued` -> `running` with a fresh lease, in one
compare-and-set. Every later write names that lease, so once recovery hands the task to another
worker (this one looked dead) nothing this one does can touch the row again.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update

from service.db import db_now, session_scope
from service.quotas import folder_bytes
from service.dispatch import enqueue
from service.errors import NO_SPACE, is_disk_full, shown_weights, without_paths
from service.models import Task, TaskEvent, TaskStatus, liveness_only, utcnow
from service.settings import get_settings
from service.storage import Storage
from worker.celery_app import TRAIN_TASK, app

log = logging.getLogger("upt.worker")
PROGRESS_EVERY_S = 1.0
_backbone = None
_backbone_lock = threading.Lock()


def get_backbone():
    """The frozen backbone, loaded once per worker process."""
    global _backbone
    from upt.backbone import load_backbone

    with _backbone_lock:
        if _backbone is None:
            settings = get_settings()
            _backbone = load_backbone(settings.model, settings.pretrained, settings.device)
        return _backbone


@app.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True)
def train_task(task_id: str) -> None:
    run_task(task_id)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(task_id: str) -> Task | None:
    lease = uuid.uuid4().hex
    with session_scope() as session:
        now = db_now(session)
        claimed = session.execute(
            update(Task).where(Task.id == task_id, Task.status == TaskStatus.queued.value)
            .values(status=TaskStatus.running.value, lease=lease, worker=worker_name(),
                    attempts=Task.attempts + 1, heartbeat_at=now, error=None)
        ).rowcount
        if not claimed:
            return None
        session.execute(update(Task).where(Task.id == task_id, Task.started_at.is_(None)).values(started_at=now))
        return session.get(Task, task_id)


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
            row = session.execute(select(Task.status, Task.lease).where(Task.id == self.task_id)).first()
            if row is None or row.lease != self.lease:
                self.stop_reason = "lost"  # deleted, or handed to another worker
                return
            if row.status == TaskStatus.cancelling.value:
                self.stop_reason = "cancel"
            self.update(session, heartbeat_at=db_now(session), **liveness_only())

    def update(self, session, **values) -> bool:
        return bool(session.execute(
            update(Task).where(Task.id == self.task_id, Task.lease == self.lease).values(**values)
        ).rowcount)


def _callbacks(lease: Lease, attempt: int):
    from upt.training import TrainCallbacks

    class DatabaseCallbacks(TrainCallbacks):
        """Progress to the task row (throttled), one event per epoch, cancellation between steps."""

        last_write = 0.0

        def on_step(self, report) -> None:
            if time.monotonic() - self.last_write < PROGRESS_EVERY_S:
                return
            self.last_write = time.monotonic()
            with session_scope() as session:
                lease.update(session, progress=report.progress, epoch=report.epoch, epochs=report.epochs,
                             loss=report.loss, accuracy=report.accuracy, eta_s=report.eta_s,
                             heartbeat_at=db_now(session))

        def on_epoch_end(self, report) -> None:
            self.last_write = time.monotonic()
            with session_scope() as session:
                if not lease.update(session, progress=report.progress, epoch=report.epoch, epochs=report.epochs,
                                    loss=report.loss, accuracy=report.accuracy, eta_s=report.eta_s,
                                    heartbeat_at=db_now(session)):
                    lease.stop_reason = "lost"
                    return
                _record_epoch(session, lease.task_id, attempt, report.as_dict())

        def should_stop(self) -> bool:
            return lease.stop_reason is not None

    return DatabaseCallbacks()


def _record_epoch(session, task_id: str, attempt: int, data: dict) -> None:
    # One row per epoch: an epoch trained again after a crash replaces its row (and its attempt
    # number shows it), so the history never lists an epoch twice.
    data = _jsonable(data)
    event = session.scalar(select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.kind == "epoch",
                                                   TaskEvent.epoch == data["epoch"]))
    if event is None:
        session.add(TaskEvent(task_id=task_id, kind="epoch", epoch=data["epoch"], attempt=attempt, data=data))
    else:
        event.attempt, event.data, event.created_at = attempt, data, utcnow()


def run_task(task_id: str) -> None:
    from upt.auto import AutoConfig, config_from_dict
    from upt.training import train

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
            config = config_from_dict(task.config)
            backbone = get_backbone()
            _check_backbone(task, backbone, settings)
            class_folders = storage.task_class_folders(task_id, len(task.class_names))
            if isinstance(config, AutoConfig):
                metrics = _train_auto(task_id, task.attempts, lease, storage, config, partial, class_folders)
            else:
                metrics = train(backbone, storage.data_dir(task_id), config, partial,
                                callbacks=_callbacks(lease, task.attempts),
                                checkpoint_dir=storage.checkpoint_dir(task_id), class_folders=class_folders).metrics
            _succeed(task_id, lease, storage, partial, metrics)
        except BaseException as error:  # noqa: BLE001 - every outcome must be written to the row
            shutil.rmtree(partial, ignore_errors=True)
            _record_failure(task_id, lease, storage, error)
            if not isinstance(error, Exception):
                raise


class WrongBackbone(Exception):
    """The task was checked against, and is meant for, another backbone than this worker's."""


def _check_backbone(task: Task, backbone, settings) -> None:
    if task.model == settings.model and task.weights_sha256 in (None, backbone.weights_sha256):
        return
    mine = shown_weights(settings.pretrained, backbone.weights_sha256)
    log.error("task %s was created for %s (%s); this worker serves %s (%s): refused", task.id, task.model,
              task.pretrained, settings.model, mine)
    raise WrongBackbone(f"This task was created for the backbone {task.model} ({task.pretrained}), but the worker "
                        f"that took it serves {settings.model} ({mine}); it refused to train it. Run workers with "
                        "the API's UPT_MODEL and UPT_PRETRAINED, then create the task again.")


def _train_auto(task_id: str, attempt: int, lease: Lease, storage: Storage, config, partial: Path,
                class_folders: list[str] | None) -> dict:
    """method=auto: the candidates one after another in this job, on one split (same seed and shots).

    Candidates finished by an earlier attempt are kept (their artifacts live beside the epoch
    checkpoints) and an interrupted one resumes from its checkpoint, so a worker killed half-way still
    ends with every candidate trained once. The row's `metrics.auto` says which candidate runs."""
    from upt.auto import AutoProgress, train_auto

    progress = AutoProgress(config, _callbacks(lease, attempt))
    finished: list[dict] = []

    def announce(running: str | None) -> None:
        state = {"candidates": list(config.candidates), "running": running, "finished": finished}
        with session_scope() as session:
            lease.update(session, metrics=_jsonable({"auto": state}))

    def callbacks_for(method: str):
        announce(method)
        return progress.for_candidate(method)

    def on_candidate(index: int, row, reused: bool) -> None:
        finished.append(row.as_dict())
        with session_scope() as session:
            _record_event(session, task_id, "candidate", index, attempt if not reused else None, row.as_dict())

    result = train_auto(get_backbone(), storage.data_dir(task_id), config.base, config.candidates, partial,
                        storage.checkpoint_dir(task_id) / "candidates", callbacks_for,
                        class_folders=class_folders, resume=True, on_candidate=on_candidate)
    return result.winner.metrics | {"auto": result.choice}


def _record_event(session, task_id: str, kind: str, index: int, attempt: int | None, data: dict) -> None:
    """One row per (kind, index); a reused result (attempt None) keeps the row of the attempt that made it."""
    event = session.scalar(select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.kind == kind,
                                                   TaskEvent.epoch == index))
    if event is None:
        session.add(TaskEvent(task_id=task_id, kind=kind, epoch=index, attempt=attempt or 1, data=_jsonable(data)))
    elif attempt is not None:
        event.attempt, event.data, event.created_at = attempt, _jsonable(data), utcnow()


def _succeed(task_id: str, lease: Lease, storage: Storage, partial: Path, metrics: dict) -> None:
    final = storage.artifact_dir(task_id)
    with session_scope() as session:
        # The row is marked first and the artifact published inside the same transaction: the UPDATE
        # holds the row (PostgreSQL) or the database (SQLite) until the commit, so recovery cannot hand
        # the task to another worker between the lease check and the rename, and a worker that lost
        # its lease (presumed dead, but still running) never replaces the artifact of the one holding it.
        done = lease.update(session, status=TaskStatus.succeeded.value, progress=1.0, metrics=_jsonable(metrics),
                            finished_at=utcnow(), eta_s=0.0, lease=None,
                            stored_bytes=Task.stored_bytes + folder_bytes(partial))
        if done:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)  # atomic: readers see no artifact or a whole one
    if done:
        storage.delete_checkpoints(task_id)
        log.info("task %s succeeded", task_id)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        _forget_if_deleted(task_id, storage)


def _record_failure(task_id: str, lease: Lease, storage: Storage, error: BaseException) -> None:
    from upt.errors import TrainingCancelled, UptError

    if isinstance(error, TrainingCancelled) and lease.stop_reason == "lost":
        _forget_if_deleted(task_id, storage)
        return
    if isinstance(error, TrainingCancelled):
        values = {"status": TaskStatus.cancelled.value}
    elif isinstance(error, Exception) and is_disk_full(error):
        values = _after_disk_full(task_id, lease, get_settings())
    elif isinstance(error, SoftTimeLimitExceeded):
        values = {"status": TaskStatus.failed.value,
                  "error": f"Training ran past the time limit (UPT_TASK_TIME_LIMIT_S={get_settings().task_time_limit_s})."}
    elif isinstance(error, (UptError, WrongBackbone)):
        values = {"status": TaskStatus.failed.value, "error": without_paths(str(error))}
    elif isinstance(error, Exception):
        log.exception("task %s failed unexpectedly", task_id)
        values = {"status": TaskStatus.failed.value,
                  "error": without_paths(f"Internal error in the worker: {type(error).__name__}: {error}")}
    else:  # worker shutdown (SystemExit, KeyboardInterrupt): leave the row for recovery to retry
        return
    retry_in_s = values.pop("retry_in_s", None)
    if retry_in_s is None:
        values["finished_at"] = utcnow()
    with session_scope() as session:
        done = lease.update(session, lease=None, eta_s=None, **values)
    if done and values["status"] == TaskStatus.cancelled.value:
        storage.delete_checkpoints(task_id)
    if done and retry_in_s is not None:
        enqueue(task_id, countdown=retry_in_s)
    if not done:
        _forget_if_deleted(task_id, storage)


def _after_disk_full(task_id: str, lease: Lease, settings) -> dict:
    """A full storage volume is usually temporary (an operator frees space, another training ends): the
    task goes back to the queue after a back-off that doubles with each try, and fails only after
    UPT_MAX_ATTEMPTS tries. Its epoch checkpoints stay, so a retry resumes where the disk filled up."""
    with session_scope() as session:
        attempts = session.scalar(select(Task.attempts).where(Task.id == task_id)) or 1
    if attempts >= settings.max_attempts:
        log.error("task %s: %s; giving up after %d tries", task_id, NO_SPACE, attempts)
        return {"status": TaskStatus.failed.value,
                "error": f"Training stopped: {NO_SPACE} ({attempts} tries, UPT_MAX_ATTEMPTS="
                         f"{settings.max_attempts}). Free space on the volume and create the task again."}
    delay = min(settings.disk_full_retry_s * 2 ** (attempts - 1), settings.disk_full_retry_max_s)
    log.error("task %s: %s; retrying in %.0fs (try %d of %d)", task_id, NO_SPACE, delay, attempts,
              settings.max_attempts)
    # enqueued_at in the future: the sweeper re-sends a lost message only UPT_REQUEUE_AFTER_S after it.
    return {"status": TaskStatus.queued.value, "retry_in_s": delay,
            "enqueued_at": utcnow() + timedelta(seconds=delay),
            "error": f"Training paused: {NO_SPACE}. Retrying in {delay:.0f}s (try {attempts} of "
                     f"{settings.max_attempts})."}


def _forget_if_deleted(task_id: str, storage: Storage) -> None:
    """The row is gone (deleted while training): remove whatever this worker wrote since."""
    with session_scope() as session:
        if session.get(Task, task_id) is None:
            storage.delete_task(task_id)


def _jsonable(value):
    """Plain JSON: PostgreSQL's json type refuses NaN and Infinity (a diverging training's loss), so
    they are stored as null, as SQLite-backed and PostgreSQL-backed services must agree."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value


# --- worker process lifecycle -------------------------------------------------------------------
from celery import signals  # noqa: E402

_sweeper = None


@signals.worker_process_init.connect
def _fresh_connections(**_) -> None:
    # A forked pool process must not share the parent's database connections.
    from service.db import get_engine

    get_engine().dispose(close=False)
    # Load the backbone now rather than on the first task, but in the background: process init has
    # a timeout of a few seconds and a real CLIP takes longer.
    threading.Thread(target=_preload_backbone, name="backbone-preload", daemon=True).start()


def _preload_backbone() -> None:
    try:
        get_backbone()
    except Exception as error:  # reported again, as the task's error, when a task needs it
        log.warning("cannot load the backbone yet: %s", error)


@signals.worker_ready.connect
def _start_recovery(**_) -> None:
    """Every worker also sweeps: lost messages and dead workers are found as long as one runs."""
    global _sweeper
    from service.recovery import Sweeper

    _sweeper = Sweeper(get_settings())
    _sweeper.start()
    parent = os.environ.get("UPT_EMBEDDED_PARENT_PID")
    if parent:
        threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True).start()


@signals.worker_shutdown.connect
def _stop_recovery(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()


def _exit_with_parent(parent_pid: int) -> None:
    """In embedded mode, go when `upt serve` goes, even if it was killed without a chance to stop us."""
    import signal

    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("upt serve (pid %d) is gone; stopping the embedded worker", parent_pid)
    os.killpg(os.getpgid(0), signal.SIGKILL)
