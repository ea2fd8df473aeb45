"""Per-tenant quotas: one tenant cannot fill the queue (429 + Retry-After) or the storage volume (507)
for everyone; the other tenants go on as before."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from svc_helpers import CLASSES, Stack, base_env, task_form


def noise_png(seed: int, side: int = 100) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()


@pytest.mark.service
def test_tenant_quotas_on_active_tasks_and_stored_bytes(tmp_path, tiny_checkpoint):
    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_DATABASE_URL=f"sqlite:///{tmp_path / 'upt.sqlite'}",
                   UPT_REQUIRE_API_KEYS="true", UPT_TENANT_MAX_ACTIVE_TASKS=2,
                   UPT_TENANT_MAX_STORED_BYTES=200_000)
    stack = Stack(env, tmp_path)
    stack.command("migrate")
    for tenant in ("a", "b"):
        stack.keys[tenant] = json.loads(stack.command("keys", "create", "--tenant", tenant, "--json"))["key"]
    stack.start_api()
    try:
        a, b = stack.client("a"), stack.client("b")
        noisy = {"class_names": CLASSES[:2], "labels": [CLASSES[i % 2] for i in range(4)], "method": "coop",
                 "shots": "1", "epochs": "1"}
        noise = [("files", (f"{i}.png", noise_png(i), "image/png")) for i in range(4)]  # about 120 KB stored
        first = a.post("/tasks", data=noisy, files=noise)
        assert first.status_code == 202, first.text
        body = assert_problem(a.post("/tasks", data=noisy, files=noise), 507)
        assert "UPT_TENANT_MAX_STORED_BYTES" in body["detail"]
        assert b.post("/tasks", data=noisy, files=noise).status_code == 202  # b has its own share
        assert a.delete(f"/tasks/{first.json()['id']}").status_code == 204  # frees a's share

        data, files = task_form(per_class=1, shots=1, epochs=1)
        for _ in range(2):
            assert a.post("/tasks", data=data, files=files).status_code == 202
        refused = a.post("/tasks", data=data, files=files)
        body = assert_problem(refused, 429)
        assert "UPT_TENANT_MAX_ACTIVE_TASKS" in body["detail"] and int(refused.headers["retry-after"]) > 0
        assert b.post("/tasks", data=data, files=files).status_code == 202
        queued = a.get("/tasks").json()["items"][0]
        assert a.post(f"/tasks/{queued['id']}/cancel").status_code == 202  # one fewer in the queue
        assert a.post("/tasks", data=data, files=files).status_code == 202

        # The epoch checkpoints of a training in progress count, though no row holds their size yet.
        training = a.get("/tasks", params={"status": "queued"}).json()["items"]
        assert a.post(f"/tasks/{training[0]['id']}/cancel").status_code == 202  # room under the task quota
        checkpoint = tmp_path / "data" / "storage" / "tasks" / training[1]["id"] / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "last.pt").write_bytes(bytes(150_000))
        body = assert_problem(a.post("/tasks", data=noisy, files=noise), 507)
        assert "checkpoints" in body["detail"]
        (checkpoint / "last.pt").unlink()
        assert a.post("/tasks", data=noisy, files=noise).status_code == 202
    finally:
        stack.api.stop()
