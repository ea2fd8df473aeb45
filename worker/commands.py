"""`upt worker`: the worker's command-line entry point (entry point `worker` of the `upt.commands`
group in pyproject.toml).

This module imports nothing but argparse: `upt` registers every command to build its parser, and
`upt train` should not import Celery, SQLAlchemy and the service to list this one. The worker
process (worker.process) is imported when the command runs.
"""

from __future__ import annotations


def register(subparsers) -> None:
    worker = subparsers.add_parser("worker", help="run a Celery worker that trains queued tasks")
    worker.add_argument("--concurrency", type=int, help="trainings at once (UPT_WORKER_CONCURRENCY, default 1)")
    worker.add_argument("--json", action="store_true", help="accepted for symmetry; logs stay text")
    worker.set_defaults(func=worker_command)


def worker_command(args) -> int:
    from worker.process import run_worker

    return run_worker(["--concurrency", str(args.concurrency)] if args.concurrency else [])
