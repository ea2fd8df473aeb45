"""Real parts for the service tests: PostgreSQL, Redis, uvicorn and celery worker subprocesses.

Each test session gets its own PostgreSQL database, its own Redis database index and queue name,
and the tiny open_clip checkpoint of tests/conftest.py (upt-tiny, random weights) for a real CLIP.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from service.db import Database
from service.migrate import upgrade
from service.settings import Settings
from svc_helpers import ALLOWED_ORIGIN, REDIS_DB, Stack, base_env, scratch_database


@pytest.fixture
def sqlite_database(tmp_path) -> Settings:
    """In-process settings on a migrated SQLite database of this test's own (no servers). The one way
    a test chooses settings: build them and pass them (`create_app(settings)`, `Database.from_settings`),
    or `.model_copy(update=...)` these; nothing is read from a process-wide cache."""
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    return settings


@pytest.fixture
def sqlite_sessions(sqlite_database):
    """Sessions on that database, for a test that writes or reads rows beside the code it tests."""
    database = Database.from_settings(sqlite_database)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def postgres_url():
    with scratch_database("upt_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_client():
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, tiny_checkpoint, postgres_url, redis_client):
    tmp = tmp_path_factory.mktemp("stack")
    env = base_env(tmp / "data", tiny_checkpoint,
                   UPT_DATABASE_URL=postgres_url, UPT_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
                   UPT_QUEUE=f"upt-test-{uuid.uuid4().hex[:8]}", UPT_REQUIRE_API_KEYS="true",
                   UPT_MAX_FILES=48, UPT_MAX_FILE_BYTES=300_000, UPT_MAX_UPLOAD_BYTES=4_000_000,
                   UPT_MAX_IMAGE_PIXELS=4_000_000, UPT_MAX_REQUEST_PIXELS=10_000_000, UPT_BATCH_WINDOW_MS=100, UPT_CORS_ORIGINS=ALLOWED_ORIGIN)
    stack = Stack(env, tmp)
    stack.command("migrate")
    for tenant in ("acme", "globex"):
        stack.keys[tenant] = json.loads(stack.command("keys", "create", "--tenant", tenant, "--json"))["key"]
    stack.start_api()
    yield stack
    stack.api.stop()


@pytest.fixture
def show_logs_on_failure(request, stack):
    yield
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        print(stack.api.tail())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def start_worker_process(monkeypatch):
    """`start(settings)`: what `upt worker` does at start (worker.tasks.start_process), for a test that
    calls the worker's functions in this process; undone after the test."""
    import worker.tasks as worker_tasks

    monkeypatch.setattr(worker_tasks, "_process", None)

    def start(settings: Settings) -> None:
        worker_tasks.start_process(settings)

    yield start
    if worker_tasks._process is not None:
        worker_tasks._process.database.dispose()
