"""The training queue: the Celery application, its queue and task names, and sending a task id to it.

The API enqueues with it; a worker process builds its own from its settings and registers the
training task on it. This module knows the task by name only: it imports neither the worker nor
torch nor the ML core (checked by tests/core/test_boundaries.py).

Reliability settings, and why:
- acks_late + reject_on_worker_lost: a message is acknowledged only after the task ran, so a worker
  that dies mid-training leaves the message to be delivered again;
- prefetch 1: a worker holds only the task it runs, so others can take the rest of the queue;
- visibility timeout (Redis) longer than the task time limit: a long but healthy training is not
  handed to a second worker while the first still runs it.
The database, not the broker, decides whether a delivered message still has work to do.
"""

from __future__ import annotations

import logging

from celery import Celery, group

from service.settings import Settings

log = logging.getLogger("upt.service")
TRAIN_TASK = "upt.train"
CANDIDATE_TASK = "upt.train_candidate"  # method=auto: one candidate of a task


def make_celery(settings: Settings) -> Celery:
    """The Celery application for `settings`, with no task registered (the worker adds its own)."""
    app = Celery("upt", broker=settings.resolved_broker_url)
    transport_options: dict = {"visibility_timeout": settings.visibility_timeout_s}
    filesystem = settings.resolved_broker_url.startswith("filesystem")
    if filesystem:
        folder = str(settings.broker_folder)  # created by ensure_broker_folder before first use
        # The control folder (exchange-queue bindings) too: its default is ./control in the working directory.
        transport_options.update(data_folder_in=folder, data_folder_out=folder, store_processed=False,
                                 control_folder=str(settings.broker_folder / "control"))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.queue,
        task_routes={TRAIN_TASK: {"queue": settings.queue}, CANDIDATE_TASK: {"queue": settings.queue}},
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(settings.task_time_limit_s - 60, 1),
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # The filesystem transport has no broadcast: remote control needs a fan-out exchange.
        worker_enable_remote_control=not filesystem,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


def ensure_broker_folder(settings: Settings) -> None:
    """The filesystem transport (local mode) needs its folder to exist before sending or consuming."""
    if settings.resolved_broker_url.startswith("filesystem"):
        (settings.broker_folder / "control").mkdir(parents=True, exist_ok=True)


class TrainingQueue:
    """The queue of training tasks of one process, built from that process's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)

    def enqueue(self, task_id: str, countdown: float | None = None) -> bool:
        """Publish the training message; always called after the task row is committed. On failure
        the row stays `queued` and recovery (service.recovery) sends it again."""
        try:
            ensure_broker_folder(self.settings)
            self.celery.send_task(TRAIN_TASK, args=[task_id], countdown=countdown)
            return True
        except Exception:  # broker down: the database still holds the task, so nothing is lost
            log.warning("could not enqueue task %s now; it will be re-sent", task_id, exc_info=True)
            return False

    def enqueue_candidates(self, task_id: str, methods: list[str], countdown: float | None = None) -> bool:
        """method=auto: one message per candidate, sent as a Celery group, so that any free worker takes
        the next candidate and N workers train N candidates at once. No chord: the job that finishes the
        last candidate is decided in the database (service.task_state.take_auto_finish), so no result
        backend is needed and a redelivered message cannot finish the task twice. On failure the rows
        stay as they are and recovery sends what is still queued again."""
        try:
            ensure_broker_folder(self.settings)
            group(self.celery.signature(CANDIDATE_TASK, args=[task_id, method], countdown=countdown)
                  for method in methods).apply_async()
            return True
        except Exception:  # broker down: the database still holds the candidates, so nothing is lost
            log.warning("could not enqueue the candidates of task %s now; they will be re-sent", task_id,
                        exc_info=True)
            return False

    def reachable(self) -> tuple[bool, str]:
        """Whether the broker answers now, and why not (for /readyz)."""
        try:
            ensure_broker_folder(self.settings)
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True, "reachable"
        except Exception as error:
            return False, f"{type(error).__name__}: {error}"
