"""The Celery application, shared by the API (to enqueue) and the workers (to consume).

Importing this module does not import torch: API replicas only send messages by task name.
Reliability settings, and why:
- acks_late + reject_on_worker_lost: a message is acknowledged only after the task ran, so a worker
  that dies mid-training leaves the message to be delivered again;
- prefetch 1: a worker holds only the task it runs, so others can take the rest of the queue;
- visibility timeout (Redis) longer than the task time limit: a long but healthy training is not
  handed to a second worker while the first still runs it.
The database, not the broker, decides whether a delivered message still has work to do.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings, get_settings

TRAIN_TASK = "upt.train"


def make_celery(settings: Settings) -> Celery:
    app = Celery("upt", broker=settings.resolved_broker_url, include=["worker.tasks"])
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
        task_routes={TRAIN_TASK: {"queue": settings.queue}},
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


app = make_celery(get_settings())
