"""Without loadable weights the service still starts, says so in /readyz, and answers the calls
that need the backbone with a problem that says how to configure it."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from svc_helpers import CLASSES, ROOT, api_without_weights, base_env, images, task_form


def test_missing_weights_are_reported_not_crashed_on(tmp_path, tiny_checkpoint):
    with api_without_weights(tmp_path, tiny_checkpoint) as url:
        deadline = time.monotonic() + 30
        while True:
            ready = httpx.get(f"{url}/readyz", timeout=30)
            backbone = ready.json()["checks"]["backbone"]
            if "still loading" not in backbone["detail"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ready.status_code == 503 and not ready.json()["ready"]
        assert ready.json()["checks"]["database"]["ok"] and ready.json()["checks"]["broker"]["ok"]
        assert not backbone["ok"] and "UPT_PRETRAINED" in backbone["detail"]

        files = [("files", (p.name, p.read_bytes(), "image/png")) for _, p in images("test", 1)]
        for response in (httpx.post(f"{url}/classify", data={"class_names": CLASSES}, files=files, timeout=30),
                         httpx.post(f"{url}/tasks", data=task_form()[0], files=task_form()[1], timeout=30)):
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/problem+json")
            problem = response.json()
            assert problem["title"] == "Backbone unavailable"
            assert "UPT_MODEL" in problem["detail"] and "no-such-weights" in problem["detail"]
        assert httpx.get(f"{url}/tasks").json()["items"] == []  # nothing was stored


def test_keys_cannot_be_switched_off_off_loopback(tmp_path, tiny_checkpoint):
    env = base_env(tmp_path, tiny_checkpoint, UPT_HOST="0.0.0.0", UPT_REQUIRE_API_KEYS="false")
    done = subprocess.run([sys.executable, "-m", "service", "serve"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "UPT_REQUIRE_API_KEYS=false" in done.stderr
