"""Migrations create exactly the schema the models describe, on PostgreSQL and on SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import service.models  # noqa: F401  (registers the tables on Base.metadata)
from service.db import Base, make_engine
from service.migrate import upgrade
from service.settings import Settings
from svc_helpers import ROOT, scratch_database


def schema_diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


@pytest.mark.service
def test_postgres_migrations_match_models():
    with scratch_database("upt_schema") as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPT_")} | {"UPT_DATABASE_URL": url}
        alembic = subprocess.run([str(Path(sys.executable).parent / "alembic"), "upgrade", "head"], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=120)  # the README's command
        assert alembic.returncode == 0, alembic.stderr
        assert schema_diff(url) == []
        upgrade(Settings(database_url=url))  # `upt migrate` afterwards: idempotent, changes nothing
        assert schema_diff(url) == []


def test_sqlite_migrations_match_models(tmp_path):
    settings = Settings(data_dir=tmp_path)
    upgrade(settings)
    assert schema_diff(settings.resolved_database_url) == []
