"""The instant stage: every task's training-free classifier (GDA by default, or Tip-Adapter's cache:
UPT_INSTANT_METHOD), ready seconds after the task is created, whatever the queue holds.

Where it is built, and why there: in the API process that stored the uploads, on a thread of its own
(off the event loop), right after the task row is committed. Not by a worker: workers may be busy
training other tasks for hours, and the time to a task's first answer must not depend on the queue.
The API process already holds the backbone for /classify, and a cache is a few encoder passes over the
shots, no training. The result is an ordinary `gda` (or `tip-adapter`) artifact in the task's folder on the shared
storage volume, so any API replica serves it; the task row holds the stage's state (building, ready,
failed), so GET /tasks/{id} and its ETag change when it is ready.

If the process that was building it died (the row says building, or nothing), the stage is built again
in two ways: /classify builds it on demand (`ensure`), and the API's sweeper resumes every such stage
older than UPT_INSTANT_RESUME_AFTER_S (`resume_unfinished`), so a task nobody asks about still becomes
ready and GET /tasks/{id} does not show `building` for ever. Both are guarded by a lock per task in this
process; two replicas building at once write the same artifact (same seed and data) and publish it with
an atomic rename, so either result is the one.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

from datetime import timedelta

from sqlalchemy import or_, select, update

from service.db import Database, db_now
from service.errors import Problem
from service.models import Task
from service.serving_cache import ServingCache
from service.settings import Settings
from service.storage import Storage
from upt.auto import config_from_dict
from upt.errors import UptError
from upt.training import TrainConfig, train

log = logging.getLogger("upt.instant")
BUILDING, READY, FAILED = "building", "ready", "failed"


def instant_key(task_id: str) -> str:
    """The instant stage's key in the API's predictor cache (beside the tuned one's, the task id)."""
    return f"{task_id}/instant"


def instant_config(task: Task, settings: Settings):
    """The task's own split (shots, seed) and templates, with the training-free method."""
    own = config_from_dict(task.config)
    own = getattr(own, "base", own)  # method=auto: the options its candidates share
    return TrainConfig.of(settings.instant_method, shots=own.shots, seed=own.seed, templates=own.templates,
                          class_names=list(task.class_names), augment_views=settings.instant_augment_views)


class InstantStages:
    """Builds, publishes and (on demand) rebuilds the instant stage of tasks."""

    def __init__(self, settings: Settings, storage: Storage, serving: ServingCache, database: Database) -> None:
        self.settings, self.storage, self.serving, self.database = settings, storage, serving, database
        # One build at a time: each is a burst of encoder passes, and /classify shares the device.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instant-stage")
        self._locks: dict[str, threading.Lock] = {}
        self._scheduled: set[str] = set()  # waiting in or running on the pool: never submitted twice
        self._guard = threading.Lock()

    def schedule(self, task_id: str) -> Future | None:
        """Build in the background (called once the task row is committed); None if already scheduled here."""
        with self._guard:
            if task_id in self._scheduled:
                return None
            self._scheduled.add(task_id)
        return self._pool.submit(self._build_logged, task_id)

    def resume_unfinished(self, limit: int = 20) -> list[str]:
        """Schedules the stages left unbuilt by a process that died: rows that say `building`, or
        nothing yet, for longer than UPT_INSTANT_RESUME_AFTER_S (a build in progress on another replica
        is younger than that; if one is not, both builds publish the same artifact). A failed stage
        stays failed: its error is shown, and retrying it every sweep would only fail again."""
        with self.database.scope() as session:
            older_than = db_now(session) - timedelta(seconds=self.settings.instant_resume_after_s)
            candidates = session.scalars(
                select(Task.id).where(or_(Task.instant_status.is_(None), Task.instant_status == BUILDING),
                                      Task.created_at < older_than)
                .order_by(Task.created_at).limit(limit)).all()
        resumed = [task_id for task_id in candidates
                   if not self.storage.has_instant(task_id) and self.schedule(task_id) is not None]
        if resumed:
            log.info("resuming the instant stage of %d task(s) left unbuilt: %s", len(resumed), ", ".join(resumed))
        return resumed

    def ensure(self, task_id: str) -> None:
        """The stage's artifact exists when this returns, or a problem says why it cannot (409: the
        build failed, and is not retried for every request; 503: the backbone is not loaded yet)."""
        if self.storage.has_instant(task_id):
            return
        self.build(task_id, retry_failed=False)
        if not self.storage.has_instant(task_id):
            with self.database.scope() as session:
                task = session.get(Task, task_id)
                error = task.instant_error if task is not None else "the task was deleted"
            raise Problem(409, "Instant stage unavailable", f"Task {task_id} has no training-free stage: {error}",
                          type="instant-stage-unavailable")

    def build(self, task_id: str, retry_failed: bool = True) -> None:
        with self._lock_of(task_id):
            if self.storage.has_instant(task_id):
                return
            with self.database.scope() as session:
                task = session.get(Task, task_id)
                if task is None or (task.instant_status == FAILED and not retry_failed):
                    return
                config = instant_config(task, self.settings)
                class_count = len(task.class_names)
                session.execute(update(Task).where(Task.id == task_id)
                                .values(instant_status=BUILDING, instant_error=None, instant_method=config.method))
            self._train_and_publish(task_id, config, class_count)

    def _train_and_publish(self, task_id: str, config, class_count: int) -> None:
        try:
            backbone = self.serving.backbone()
        except Problem:  # not loaded yet (503): not a failure of this task's stage, try again later
            self._mark(task_id, instant_status=None)
            raise
        # The serving encoder (compiled, bf16 on CPUs with bf16 units) encodes the cache: no gradient
        # is needed, and its features are those the stage will be asked about. Its background passes
        # go in slices that yield to /classify's (service.shared_encoder).
        encoder = self.serving.image_encoder(backbone)
        partial = self.storage.task_dir(task_id) / f"instant.partial-{uuid.uuid4().hex}"
        try:
            result = train(backbone, self.storage.data_dir(task_id), config, partial,
                           class_folders=self.storage.task_class_folders(task_id, class_count),
                           cache_encoder=lambda images: encoder.background(images, normalize=False))
        except UptError as error:
            shutil.rmtree(partial, ignore_errors=True)
            self._mark(task_id, instant_status=FAILED, instant_error=str(error))
            return
        except Exception as error:
            shutil.rmtree(partial, ignore_errors=True)
            log.exception("instant stage of task %s failed", task_id)
            self._mark(task_id, instant_status=FAILED, instant_error=f"Internal error: {type(error).__name__}: {error}")
            return
        with self.database.scope() as session:
            # Published in the transaction that marks it ready: a reader that sees `ready` finds the folder.
            marked = session.execute(update(Task).where(Task.id == task_id).values(
                instant_status=READY, instant_accuracy=result.metrics["val_accuracy"], instant_error=None)).rowcount
            if marked:
                shutil.rmtree(self.storage.instant_dir(task_id), ignore_errors=True)
                partial.rename(self.storage.instant_dir(task_id))
        if not marked:  # deleted meanwhile: leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
            self.storage.delete_task(task_id)

    def _mark(self, task_id: str, instant_status: str | None, instant_error: str | None = None) -> None:
        """The instant stage's own columns only: the task's `status` is service.task_state's."""
        with self.database.scope() as session:
            session.execute(update(Task).where(Task.id == task_id)
                            .values(instant_status=instant_status, instant_error=instant_error))

    def _build_logged(self, task_id: str) -> None:
        try:
            self.build(task_id)
        except Problem as problem:  # the backbone is not loaded yet: the sweeper resumes it later
            log.info("instant stage of task %s postponed: %s", task_id, problem.detail)
        except Exception:  # a background build never takes the API down; /classify or the sweeper retries it
            log.exception("building the instant stage of task %s failed", task_id)
        finally:
            with self._guard:
                self._scheduled.discard(task_id)

    def _lock_of(self, task_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(task_id, threading.Lock())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
