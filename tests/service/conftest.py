"""Real parts for the service tests: PostgreSQL, Redis, uvicorn and celery worker subprocesses.

Each test session gets its own PostgreSQL database, its own Redis database index and queue name,
and the tiny open_clip checkpoint of tests/conftest.py (upt-tiny, random weights) for a real CLIP.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import redis

from service import db
from service.migrate import upgrade
from service.settings import get_settings
from svc_helpers import ALLOWED_ORIGIN, PG_ADMIN, REDIS_DB, Stack, base_env


@pytest.fixture
def sqlite_database(tmp_path, monkeypatch):
    """In-process settings on a migrated SQLite database of this test's own (no servers)."""
    monkeypatch.setenv("UPT_DATA_DIR", str(tmp_path))
    for cached in (get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()
    settings = get_settings()
    upgrade(settings)
    yield settings
    db.get_engine().dispose()
    for cached in (get_settings, db.get_engine, db.get_sessionmaker):
        cached.cache_clear()


@pytest.fixture(scope="session")
def postgres_url():
    name = f"upt_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
