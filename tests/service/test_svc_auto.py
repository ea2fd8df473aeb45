"""method=auto through the service: candidates on one split, the leaderboard and the winner's artifact,
and a worker killed half-way that still ends with every candidate trained once and one winner."""

from __future__ import annotations

import time

import pytest

from svc_helpers import task_form, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]
CANDIDATES = ["tip-adapter", "coop", "vpt-shallow"]


def wait_for_candidate(client, task_id: str, method: str, epoch: int, timeout: float = 120) -> dict:
    """Until `method` runs and has finished `epoch` of its own epochs."""
    deadline = time.monotonic() + timeout
    task = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        auto = (task.get("metrics") or {}).get("auto", {})
        events = client.get(f"/tasks/{task_id}/events").json()["items"]
        if auto.get("running") == method and any(e["data"].get("candidate") == method
                                                 and e["data"]["candidate_epoch"] >= epoch for e in events):
            return task
        if task["status"] in {"succeeded", "failed"}:
            break
        time.sleep(0.1)
    raise AssertionError(f"{method} of task {task_id} did not reach epoch {epoch}: {task}")


def test_a_worker_killed_during_auto_still_trains_every_candidate_once(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=8, method="auto", candidates=",".join(CANDIDATES), shots=4, epochs=8,
                            batch_size=2, seed=2)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    assert created.json()["method"] == "auto" and created.json()["config"]["candidates"] == CANDIDATES
    first = stack.start_worker("worker-auto-killed")
    try:
        running = wait_for_candidate(client, task_id, "coop", 2)
        assert running["status"] == "running" and running["epochs"] == 16  # 0 + 8 + 8 epochs, all together
        assert [row["method"] for row in running["metrics"]["auto"]["finished"]] == ["tip-adapter"]
        assert 0 < running["progress"] < 1
    finally:
        first.kill_group()
    wait_for(client, task_id, {"queued"}, timeout=30)
    second = stack.start_worker("worker-auto-resumed")
    try:
        done = wait_for(client, task_id, {"succeeded", "failed"}, timeout=300)
    finally:
        second.stop()
    assert done["status"] == "succeeded", (done, second.tail())
    assert done["attempts"] == 2
    auto = done["metrics"]["auto"]
    board = auto["leaderboard"]
    assert [row["method"] for row in board] == CANDIDATES  # each candidate once
    best = max(board, key=lambda row: (row["val_accuracy"], -row["trainable_parameters"]))
    assert auto["winner"] == best["method"] and done["metrics"]["val_accuracy"] == best["val_accuracy"]
    assert auto["val_count"] == 16 and {row["val_count"] for row in board} == {16}  # one split for all
    events = client.get(f"/tasks/{task_id}/events").json()["items"]
    finished = [e for e in events if e["kind"] == "candidate"]
    assert [e["data"]["method"] for e in finished] == CANDIDATES
    assert [e["attempt"] for e in finished] == [1, 2, 2]  # tip-adapter was not trained again
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, 17))
    assert [e["data"]["candidate"] for e in epochs] == ["coop"] * 8 + ["vpt-shallow"] * 8
    artifact_config = client.get(f"/tasks/{task_id}/artifact")
    assert artifact_config.status_code == 200
    assert client.delete(f"/tasks/{task_id}").status_code == 204


def test_auto_options_are_checked_before_a_task_exists(stack):
    client = stack.client("acme")
    for options, field in [({"method": "auto", "candidates": "coop,nope"}, "candidates"),
                           ({"method": "coop", "candidates": "coop,upt"}, "candidates"),
                           ({"method": "auto", "candidates": "coop,vpt-deep", "depth": "99"}, "depth")]:
        data, files = task_form(per_class=2, **{k: v for k, v in options.items() if k != "method"},
                                method=options["method"])
        answer = client.post("/tasks", data=data, files=files)
        assert answer.status_code == 422, answer.text
        assert field in answer.text
