"""An Idempotency-Key held by a request that died is taken over after UPT_IDEMPOTENCY_LOCK_STALE_S, a
setting (it was a 15-minute constant), judged by the database's clock."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.db import db_now
from service.models import IdempotencyLock, Tenant
from service.settings import Settings
from svc_helpers import Stack, base_env, task_form


def test_the_lock_must_outlast_the_longest_body():
    with pytest.raises(ValueError, match="UPT_IDEMPOTENCY_LOCK_STALE_S"):
        Settings(body_timeout_s=900, idempotency_lock_stale_s=600)
    assert Settings(body_timeout_s=30, idempotency_lock_stale_s=60).idempotency_lock_stale_s == 60


@pytest.mark.service
def test_a_key_left_held_by_a_dead_request_is_taken_over_after_the_setting(tmp_path, tiny_checkpoint):
    database = f"sqlite:///{tmp_path / 'upt.sqlite'}"
    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_DATABASE_URL=database, UPT_REQUIRE_API_KEYS="true",
                   UPT_BODY_TIMEOUT_S=5, UPT_IDEMPOTENCY_LOCK_STALE_S=6)
    stack = Stack(env, tmp_path)
    stack.command("migrate")
    stack.keys["a"] = json.loads(stack.command("keys", "create", "--tenant", "a", "--json"))["key"]
    stack.start_api()
    try:
        engine = create_engine(database)
        with Session(engine) as session:  # what a POST killed while its body arrived leaves behind
            tenant = session.scalar(select(Tenant).where(Tenant.name == "a"))
            session.add(IdempotencyLock(tenant_id=tenant.id, key="died-1", created_at=db_now(session)))
            session.commit()
        engine.dispose()
        client = stack.client("a")
        data, files = task_form(per_class=1, shots=1, epochs=1)
        held = client.post("/tasks", data=data, files=files, headers={"Idempotency-Key": "died-1"})
        assert held.status_code == 409, held.text
        time.sleep(6.5)
        taken = client.post("/tasks", data=data, files=files, headers={"Idempotency-Key": "died-1"})
        assert taken.status_code == 202, taken.text
        again = client.post("/tasks", data=data, files=files, headers={"Idempotency-Key": "died-1"})
        assert again.status_code == 202 and again.json()["id"] == taken.json()["id"]  # a retry replays it
    finally:
        stack.api.stop()
