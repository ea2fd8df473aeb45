"""The instant stage: every task's training-free classifier (GDA by default, or Tip-Adapter's cache:
UPT_INSTANT_METHOD), ready seconds after the task is created, whatever the queue holds.

Where it is built, and why there: in the API process that stored the uploads, on a thread of its own
(off the event loop), right after the task row is committed. Not by a worker: workers may be busy
training other tasks for hours, and the time to a task's first answer must not depend on the queue.
The API process already holds the backbone for /classify, and a cache is a few encoder passes over the
shots, no training. The result is an ordinary `gda` (or `tip-adapter`) artifact in the task's folder on the shared
storage volume, so any API replica serves it; the task row holds the stage's state (building, ready,
failed), so GET /tasks/{id} and its ETag change when it is ready.

One build per task across replicas: a build claims the stage in the task row by compare-and-set
(`instant_build`, `instant_claimed_at`), and only the claimant builds. It writes to a folder of its own
and publishes by renaming it to a fresh name, `instant-<build>`, then committing that build as the
ready one in the row (again only if it still holds the claim): nothing is ever deleted or replaced
under a reader, which finds the folder the row names.

If the process that was building it died (the row says building, claimed long ago, or nothing), the
stage is built again in two ways: /classify builds it on demand (`ensure`), and the API's sweeper
resumes every such stage older than UPT_INSTANT_RESUME_AFTER_S (`resume_unfinished`), so a task nobody
asks about still becomes ready and GET /tasks/{id} does not show `building` for ever. A build that
failed for a transient reason (the volume full) is left unclaimed, so it is built again the same ways.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from sqlalchemy import and_, or_, select, update

from service.db import Database, db_now
from service.errors import NO_SPACE, Problem, disk_full, is_disk_full, not_found
from service.models import Task
from service.quotas import folder_bytes
from service.serving_cache import ServingCache
from service.settings import Settings
from service.storage import Storage
from upt.auto import config_from_dict
from upt.errors import UptError
from upt.training import TrainConfig, train

log = logging.getLogger("upt.instant")
BUILDING, READY, FAILED = "building", "ready", "failed"
PAUSED = "Paused"  # how a stage left unclaimed by a transient failure says so in its error
# How long /classify waits for a build that another process holds, and how often it looks.
ENSURE_WAIT_S = 30.0
ENSURE_POLL_S = 0.5


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
        """Schedules the stages left unbuilt: rows that say nothing yet, or `building` under a claim
        older than UPT_INSTANT_RESUME_AFTER_S (its process died; a build in progress is younger), for
        tasks created longer ago than that. A failed stage stays failed: its error is shown, and
        retrying it every sweep would only fail again."""
        with self.database.scope() as session:
            older_than = db_now(session) - timedelta(seconds=self.settings.instant_resume_after_s)
            candidates = session.scalars(
                select(Task.id).where(self._claimable(older_than), Task.created_at < older_than)
                .order_by(Task.created_at).limit(limit)).all()
        resumed = [task_id for task_id in candidates if self.schedule(task_id) is not None]
        if resumed:
            log.info("resuming the instant stage of %d task(s) left unbuilt: %s", len(resumed), ", ".join(resumed))
        return resumed

    def ensure(self, task_id: str) -> Path:
        """The stage's folder, ready, or a problem that says why not: 404, the task is gone (deleted on
        another replica, say); 409, its build failed (not retried for every request); 503, the backbone
        is not loaded yet, or another process builds it still after ENSURE_WAIT_S; 507, the volume is full."""
        deadline, built = time.monotonic() + ENSURE_WAIT_S, False
        while True:
            row = self._row(task_id)
            if row is None:
                raise not_found(f"Task {task_id}")
            lost = None
            if row.instant_status == READY:
                folder = self.storage.instant_dir(task_id, row.instant_build)
                if self.storage.has_instant(task_id, row.instant_build):
                    return folder
                if self._row(task_id) is None:  # deleted while we looked
                    raise not_found(f"Task {task_id}")
                lost = row  # its folder lost (a volume restored from a backup): built again
            if row.instant_status == FAILED or built:
                raise self._unavailable(task_id, row.instant_error)
            built = self.build(task_id, retry_failed=False, lost=lost)  # False: another process holds the claim
            if not built and time.monotonic() > deadline:
                raise Problem(503, "Instant stage building", f"Task {task_id}'s training-free stage is being built "
                              "by another API process; retry in a few seconds.", type="instant-stage-building",
                              headers={"Retry-After": "5"})
            if not built:
                time.sleep(ENSURE_POLL_S)

    def build(self, task_id: str, retry_failed: bool = True, lost=None) -> bool:
        """Claims the stage and builds it; False if it was not this call's to build (ready, failed and
        not to be retried, deleted, or claimed by a build in progress elsewhere). `lost`: the row of a
        ready stage whose folder is gone, claimed again only if no other build has replaced it since."""
        build = uuid.uuid4().hex
        with self.database.scope() as session:
            now = db_now(session)
            claimable = self._claimable(now - timedelta(seconds=self.settings.instant_resume_after_s))
            if retry_failed:
                claimable = or_(claimable, Task.instant_status == FAILED)
            if lost is not None:
                same = Task.instant_build.is_(None) if lost.instant_build is None else Task.instant_build == lost.instant_build
                claimable = or_(claimable, and_(Task.instant_status == READY, same))
            claimed = session.execute(update(Task).where(Task.id == task_id, claimable).values(
                instant_status=BUILDING, instant_build=build, instant_claimed_at=now, instant_error=None,
                instant_method=self.settings.instant_method)).rowcount
            task = session.get(Task, task_id) if claimed else None
            if task is None:
                return False
            config = instant_config(task, self.settings)
            class_count = len(task.class_names)
        self._train_and_publish(task_id, build, config, class_count)
        return True

    @staticmethod
    def _claimable(stale_before):
        """Rows whose stage nobody builds: never claimed (or left unclaimed after a transient failure), or
        claimed before `stale_before` by a process that has died since."""
        return or_(Task.instant_status.is_(None),
                   and_(Task.instant_status == BUILDING,
                        or_(Task.instant_claimed_at.is_(None), Task.instant_claimed_at < stale_before)))

    def _row(self, task_id: str):
        with self.database.scope() as session:
            return session.execute(select(Task.instant_status, Task.instant_build, Task.instant_error)
                                   .where(Task.id == task_id)).first()

    def _unavailable(self, task_id: str, error: str | None) -> Problem:
        if error and error.startswith(PAUSED):
            return disk_full()
        return Problem(409, "Instant stage unavailable", f"Task {task_id} has no training-free stage: {error}",
                       type="instant-stage-unavailable")

    def _train_and_publish(self, task_id: str, build: str, config, class_count: int) -> None:
        try:
            backbone = self.serving.backbone()
        except Problem:  # not loaded yet (503): not a failure of this task's stage, try again later
            self._release(task_id, build)
            raise
        # The serving encoder (compiled, bf16 on CPUs with bf16 units) encodes the cache: no gradient
        # is needed, and its features are those the stage will be asked about. Its background passes
        # go in slices that yield to /classify's (service.shared_encoder).
        encoder = self.serving.image_encoder(backbone)
        partial = self.storage.task_dir(task_id) / f"instant.partial-{build}"
        try:
            result = train(backbone, self.storage.data_dir(task_id), config, partial,
                           class_folders=self.storage.task_class_folders(task_id, class_count),
                           cache_encoder=lambda images: encoder.background(images, normalize=False))
            published = self.storage.instant_dir(task_id, build)
            partial.rename(published)  # a fresh name: nothing a reader may hold is replaced
        except Exception as error:
            shutil.rmtree(partial, ignore_errors=True)
            self._failed(task_id, build, error)
            return
        with self.database.scope() as session:
            # Ready in the row only once the folder it names is in place, and only for the claim's holder.
            marked = session.execute(update(Task).where(Task.id == task_id, Task.instant_build == build).values(
                instant_status=READY, instant_accuracy=result.metrics["val_accuracy"], instant_error=None,
                stored_bytes=Task.stored_bytes + folder_bytes(published))).rowcount
        if not marked:
            shutil.rmtree(published, ignore_errors=True)
            if self._row(task_id) is None:  # deleted meanwhile: leave nothing behind
                self.storage.delete_task(task_id)

    def _failed(self, task_id: str, build: str, error: Exception) -> None:
        """A transient failure (the volume full) leaves the stage unclaimed, to be built again by the
        sweeper or /classify once space is freed; any other is the stage's error, shown and kept."""
        if is_disk_full(error):
            log.error("instant stage of task %s paused: %s", task_id, NO_SPACE)
            self._release(task_id, build, f"{PAUSED}: {NO_SPACE}; it is built again once space was freed.")
        elif isinstance(error, UptError):
            self._fail(task_id, build, str(error))
        else:
            log.error("instant stage of task %s failed", task_id, exc_info=error)
            self._fail(task_id, build, f"Internal error: {type(error).__name__}: {error}")

    def _release(self, task_id: str, build: str, error: str | None = None) -> None:
        """The stage back to unbuilt and unclaimed, to be built again (`error` says why it waits)."""
        self._write(task_id, build, None, error, release_claim=True)

    def _fail(self, task_id: str, build: str, error: str) -> None:
        self._write(task_id, build, FAILED, error)

    def _write(self, task_id: str, build: str, status: str | None, error: str | None,
               release_claim: bool = False) -> None:
        """The instant stage's own columns only (the task's `status` is service.task_state's), and only
        while this build holds the claim."""
        statement = update(Task).where(Task.id == task_id, Task.instant_build == build)
        statement = statement.values(instant_status=status, instant_error=error)
        if release_claim:
            statement = statement.values(instant_claimed_at=None)
        with self.database.scope() as session:
            session.execute(statement)

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

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
