"""Sending a task id to the broker. Always called after the task row is committed."""

from __future__ import annotations

import logging

log = logging.getLogger("upt.service")


def enqueue(task_id: str, countdown: float | None = None) -> bool:
    """Publish the training message; on failure the row stays `queued` and recovery re-sends it."""
    from service.settings import get_settings
    from worker.celery_app import TRAIN_TASK, app, ensure_broker_folder

    try:
        ensure_broker_folder(get_settings())
        app.send_task(TRAIN_TASK, args=[task_id], countdown=countdown)
        return True
    except Exception:  # broker down: the database still holds the task, so nothing is lost
        log.warning("could not enqueue task %s now; it will be re-sent", task_id, exc_info=True)
        return False


def broker_reachable() -> tuple[bool, str]:
    from service.settings import get_settings
    from worker.celery_app import app, ensure_broker_folder

    try:
        ensure_broker_folder(get_settings())
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True, "reachable"
    except Exception as error:
        return False, f"{type(error).__name__}: {error}"
