"""`upt serve`, `upt migrate` and `upt keys`: the service's command-line entry points.

The `upt` CLI finds them through the `upt.commands` entry-point group (pyproject.toml), as it finds
`upt worker`: each entry point is a function that adds its sub-command to the CLI's
subparsers and sets `func(args) -> int`. Module imports stay light (the service stack is imported
when a command runs), so that `upt train` does not pay for FastAPI and SQLAlchemy to list these.
Each command builds its settings once, when it starts, and passes them (and a database built from
them) explicitly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys

WORKER_STOP_GRACE_S = 10.0
EMBEDDED_PARENT_ENV = "UPT_EMBEDDED_PARENT_PID"  # the worker that `upt serve` starts exits with it
SHUTDOWN_GRACE_S = 10.0  # for requests still running when `upt serve` is asked to stop


def register_serve(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP API (and, unless --no-worker, a worker)")
    serve.add_argument("--host", help="bind address (UPT_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (UPT_PORT, default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="API only: workers run elsewhere (`upt worker`)")
    serve.add_argument("--migrate", action="store_true", help="run `alembic upgrade head` first")
    serve.add_argument("--json", action="store_true", help="print the start-up summary as JSON")
    serve.set_defaults(func=serve_command)


def register_migrate(subparsers) -> None:
    migrate = subparsers.add_parser("migrate", help="create or upgrade the database schema (alembic upgrade head)")
    migrate.add_argument("--json", action="store_true", help="machine-readable output")
    migrate.set_defaults(func=migrate_command)


def register_keys(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key for a tenant and print it (shown once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(func=keys_create_command)
    listing = keys_sub.add_parser("list", help="list keys (prefixes only) and their tenants")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=keys_list_command)
    revoke = keys_sub.add_parser("revoke", help="revoke a key, given the key or its prefix from `keys list`")
    revoke.add_argument("key", help="the key, or its first 12 characters")
    revoke.add_argument("--json", action="store_true", help="machine-readable output")
    revoke.set_defaults(func=keys_revoke_command)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _apply_overrides(args) -> None:
    # Through the environment, so the embedded worker process sees the same settings.
    if getattr(args, "host", None):
        os.environ["UPT_HOST"] = args.host
    if getattr(args, "port", None):
        os.environ["UPT_PORT"] = str(args.port)


def serve_command(args) -> int:
    _apply_overrides(args)
    from service.app import create_app
    from service.header_timeout import server_options
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level)
    try:
        settings.check()
    except ValueError as error:
        print(f"upt serve: {error}", file=sys.stderr)
        return 2
    if args.migrate or settings.should_auto_migrate:
        upgrade(settings)
    summary = {
        "url": f"http://{settings.host}:{settings.port}",
        "database": settings.resolved_database_url.split("@")[-1],
        "broker": settings.resolved_broker_url.split("@")[-1],
        "storage": str(settings.storage_dir.resolve()),
        "api_keys_required": settings.api_keys_required,
        "worker": not args.no_worker,
    }
    worker = None if args.no_worker else start_embedded_worker()
    summary["worker_pid"] = worker.pid if worker else None
    _announce(summary, args.json)
    try:
        import uvicorn

        # Bounded: an open event stream (a browser following a task) would otherwise hold shutdown
        # until its task ends; after the grace period it is cut and EventSource reconnects elsewhere.
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
                    **server_options(settings))
    finally:
        if worker is not None:
            stop_embedded_worker(worker)
    return 0


def _announce(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary), flush=True)
        return
    print(f"upt serve: {summary['url']}  database {summary['database']}  broker {summary['broker']}  "
          f"storage {summary['storage']}", flush=True)
    if summary["worker_pid"]:
        print(f"upt serve: started a worker (pid {summary['worker_pid']}); stop both with Ctrl-C", flush=True)
    if summary["api_keys_required"]:
        print("upt serve: API keys are required (create one with `upt keys create --tenant NAME`).", flush=True)
    else:
        print("upt serve: API keys are NOT required: bound to a loopback address only, every request acts as "
              "tenant 'local'. Set UPT_HOST to serve others; keys are then required.", flush=True)


def start_embedded_worker() -> subprocess.Popen:
    """A worker process beside the API, in its own process group so Ctrl-C reaches only `serve`.
    Started as `upt worker`, which the CLI finds by its entry point like this command."""
    env = dict(os.environ, **{EMBEDDED_PARENT_ENV: str(os.getpid())})
    return subprocess.Popen([sys.executable, "-m", "upt", "worker"], env=env, start_new_session=True)


def stop_embedded_worker(worker: subprocess.Popen) -> None:
    """Ask the worker to stop; a training still running after the grace period is killed and
    resumes from its last epoch checkpoint at the next start (recovery re-queues it)."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=WORKER_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def migrate_command(args) -> int:
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings()
    upgrade(settings)
    url = settings.resolved_database_url.split("@")[-1]
    print(json.dumps({"migrated": True, "database": url}) if args.json else f"Schema is up to date: {url}")
    return 0


def _database(settings):
    from service.db import Database

    return Database.from_settings(settings)


def keys_create_command(args) -> int:
    from service.auth import create_key
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings()
    if settings.should_auto_migrate:
        upgrade(settings)
    with _database(settings).scope() as session:
        key = create_key(session, args.tenant)
    if args.json:
        print(json.dumps({"tenant": args.tenant, "key": key}))
    else:
        print(key)
        print(f"(API key for tenant {args.tenant!r}; it is stored hashed and cannot be shown again)", file=sys.stderr)
    return 0


def keys_list_command(args) -> int:
    from sqlalchemy import select

    from service.models import ApiKey, Tenant
    from service.settings import Settings

    with _database(Settings()).scope() as session:
        query = select(ApiKey, Tenant.name).join(Tenant).order_by(Tenant.name, ApiKey.id)
        if args.tenant:
            query = query.where(Tenant.name == args.tenant)
        rows = [{"tenant": name, "prefix": key.prefix, "created_at": key.created_at.isoformat(),
                 "revoked": key.revoked_at is not None} for key, name in session.execute(query).all()]
    if args.json:
        print(json.dumps(rows))
    for row in [] if args.json else rows:
        print(f"{row['prefix']}  {row['tenant']}  created {row['created_at']}{'  revoked' if row['revoked'] else ''}")
    return 0


def keys_revoke_command(args) -> int:
    from sqlalchemy import update

    from service.auth import hash_key
    from service.models import ApiKey, utcnow
    from service.settings import Settings

    prefix = args.key[:12]
    with _database(Settings()).scope() as session:
        matches = session.query(ApiKey).filter(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).all()
        if len(args.key) > 12:  # a whole key: match it exactly
            matches = [key for key in matches if key.key_hash == hash_key(args.key)]
        if len(matches) != 1:
            print(f"upt keys revoke: {len(matches)} active keys match {prefix!r}; give the whole key.", file=sys.stderr)
            return 1
        session.execute(update(ApiKey).where(ApiKey.id == matches[0].id).values(revoked_at=utcnow()))
    print(json.dumps({"revoked": prefix}) if args.json else f"Revoked {prefix}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m service COMMAND`: the same commands without the rest of the `upt` CLI."""
    parser = argparse.ArgumentParser(prog="python -m service")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in (register_serve, register_migrate, register_keys):
        register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)
