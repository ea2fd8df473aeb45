"""Settings come from UPT_* environment variables and a .env file; local mode derives its URLs."""

from __future__ import annotations

import pytest

from service.settings import Settings


def test_dotenv_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("UPT_PORT", "UPT_MODEL", "UPT_DATA_DIR", "UPT_DATABASE_URL", "UPT_BROKER_URL", "UPT_HOST"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("UPT_PORT=9123\nUPT_MODEL=ViT-B-32\n")
    monkeypatch.setenv("UPT_MODEL", "upt-tiny")  # the environment wins over the file
    settings = Settings()
    assert settings.port == 9123 and settings.model == "upt-tiny"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'var' / 'upt.sqlite'}"
    assert settings.resolved_broker_url == "filesystem://" and settings.broker_folder == tmp_path / "var" / "broker"
    assert settings.should_auto_migrate and not settings.api_keys_required


def test_keys_follow_the_bind_address():
    assert not Settings(host="127.0.0.1").api_keys_required
    assert not Settings(host="::1").api_keys_required
    assert Settings(host="0.0.0.0").api_keys_required
    assert Settings(host="127.0.0.1", require_api_keys=True).api_keys_required
    with pytest.raises(ValueError, match="UPT_REQUIRE_API_KEYS"):
        Settings(host="0.0.0.0", require_api_keys=False).check()
    production = Settings(database_url="postgresql+psycopg://u@db/upt", broker_url="redis://r:6379/0")
    assert not production.should_auto_migrate and not production.is_sqlite


def test_two_apps_in_one_process_each_see_the_settings_they_were_created_with(tmp_path):
    """Every request dependency reads its app's settings and database (app.state), not a process-wide
    cache: before, both apps answered with the settings of the first `get_settings()` of the process."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key
    from service.db import Database
    from service.migrate import upgrade

    strict = Settings(data_dir=tmp_path / "strict", require_api_keys=True, preload_backbone=False)
    open_ = Settings(data_dir=tmp_path / "open", require_api_keys=False, preload_backbone=False)
    for settings in (strict, open_):
        upgrade(settings)
    database = Database.from_settings(strict)
    with database.scope() as session:
        key = create_key(session, "acme")  # a key of the strict app's database only
    database.dispose()
    bearer = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(strict)) as strict_client, TestClient(create_app(open_)) as open_client:
        assert strict_client.get("/tasks").status_code == 401  # keys required by its settings
        assert strict_client.get("/tasks", headers=bearer).status_code == 200  # found in its database
        assert open_client.get("/tasks").status_code == 200  # tenant `local`: no key needed
        assert open_client.get("/tasks", headers=bearer).status_code == 401  # not in its database
        assert strict_client.app.state.settings is strict and open_client.app.state.settings is open_
