"""Schema migrations with Alembic, usable without an alembic.ini (an installed package has none)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations
from service.settings import Settings


def alembic_config(settings: Settings) -> Config:
    config = Config()
    # __path__ rather than __file__: an editable install may expose the folder as a namespace package.
    config.set_main_option("script_location", str(Path(list(migrations.__path__)[0])))
    config.set_main_option("sqlalchemy.url", settings.resolved_database_url.replace("%", "%%"))
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    if settings.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
