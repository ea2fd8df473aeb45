"""The worker process (`upt worker`, `python -m worker`): its Celery app and its lifecycle hooks.

The process builds its training queue from its own settings and registers the training task on it
(service.queue knows the task only by name, so the API never imports this package). Hooks:
- each forked pool process opens its own database connections and preloads the backbone;
- the process also sweeps (service.recovery): lost messages and dead workers are found as long as one
  worker runs;
- started by `upt serve` (embedded mode), it stops when that process goes, even if killed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time

from celery import signals

from service.commands import EMBEDDED_PARENT_ENV, configure_logging
from service.queue import CANDIDATE_TASK, TRAIN_TASK, TrainingQueue, ensure_broker_folder
from service.recovery import Sweeper
from service.settings import Settings
from worker.tasks import WorkerProcess, get_backbone, run_candidate, run_task, start_process

log = logging.getLogger("upt.worker")


def build_queue(settings: Settings) -> TrainingQueue:
    """The training queue of a worker: the service's, with the training task registered on it."""
    queue = TrainingQueue(settings)

    # shared=False: the task belongs to this app only, not to every Celery app of the process.
    @queue.celery.task(name=TRAIN_TASK, acks_late=True, reject_on_worker_lost=True, shared=False)
    def train_task(task_id: str) -> None:
        run_task(task_id, queue)

    @queue.celery.task(name=CANDIDATE_TASK, acks_late=True, reject_on_worker_lost=True, shared=False)
    def train_candidate(task_id: str, method: str) -> None:
        run_candidate(task_id, method, queue)

    return queue


class WorkerHooks:
    """What the worker process does at Celery's lifecycle signals."""

    def __init__(self, process: WorkerProcess, queue: TrainingQueue) -> None:
        self.settings, self.database, self.queue = process.settings, process.database, queue
        self.sweeper: Sweeper | None = None

    def connect(self) -> None:
        # weak=False: the signals would otherwise hold these bound methods weakly and drop them.
        signals.worker_process_init.connect(self.pool_process_started, weak=False)
        signals.worker_ready.connect(self.worker_ready, weak=False)
        signals.worker_shutdown.connect(self.worker_shutdown, weak=False)

    def pool_process_started(self, **_) -> None:
        # A forked pool process must not share the parent's database connections.
        self.database.dispose(close=False)
        # Load the backbone now rather than on the first task, but in the background: process init has
        # a timeout of a few seconds and a real CLIP takes longer.
        threading.Thread(target=_preload_backbone, name="backbone-preload", daemon=True).start()

    def worker_ready(self, **_) -> None:
        """Every worker also sweeps: lost messages and dead workers are found as long as one runs."""
        self.sweeper = Sweeper(self.settings, self.database, self.queue)
        self.sweeper.start()
        parent = os.environ.get(EMBEDDED_PARENT_ENV)
        if parent:
            threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True).start()

    def worker_shutdown(self, **_) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()


def _preload_backbone() -> None:
    try:
        get_backbone()
    except Exception as error:  # reported again, as the task's error, when a task needs it
        log.warning("cannot load the backbone yet: %s", error)


def _exit_with_parent(parent_pid: int) -> None:
    """In embedded mode, go when `upt serve` goes, even if it was killed without a chance to stop us."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.warning("upt serve (pid %d) is gone; stopping the embedded worker", parent_pid)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def run_worker(argv: list[str]) -> int:
    """`upt worker`: prefork pool, prefetch 1, late acks (configured in service.queue)."""
    parser = argparse.ArgumentParser(prog="upt worker")
    parser.add_argument("--concurrency", type=int)
    args = parser.parse_args(argv)
    settings = Settings()  # once, at start: every task and hook of this worker uses these
    process = start_process(settings)
    configure_logging(settings.log_level)
    ensure_broker_folder(settings)
    queue = build_queue(settings)
    WorkerHooks(process, queue).connect()
    celery_argv = ["worker", f"--loglevel={settings.log_level.upper()}", "--pool=prefork",
                   f"--concurrency={args.concurrency or settings.worker_concurrency}",
                   "--prefetch-multiplier=1", "-O", "fair", "-Q", settings.queue]
    if settings.resolved_broker_url.startswith("filesystem"):
        celery_argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    queue.celery.worker_main(celery_argv)
    return 0


def answers_ping() -> bool:
    """Whether the worker of this host answers a Celery ping through the broker (the container's
    health check: `python -m worker --ping`)."""
    queue = TrainingQueue(Settings())
    return bool(queue.celery.control.ping(destination=[f"celery@{socket.gethostname()}"], timeout=10))
