"""method=auto through the service: candidates on one split, the leaderboard and the winner's artifact,
and a worker killed half-way that still ends with every candidate trained once and one winner."""

from __future__ import annotations

import time

import pytest

from svc_helpers import task_form, wait_for, wait_until
from upt.auto import LeaderboardRow, pick_winner

pytestmark = [pytest.mark.service, pytest.mark.slow]
CANDIDATES = ["tip-adapter", "coop", "vpt-shallow"]


def auto_of(client, task_id: str) -> dict:
    return (client.get(f"/tasks/{task_id}").json().get("metrics") or {}).get("auto", {})


def wait_for_candidate(client, task_id: str, method: str, epoch: int, timeout: float = 120) -> dict:
    """Until `method` runs and has finished `epoch` of its own epochs."""
    deadline = time.monotonic() + timeout
    task = {}
    while time.monotonic() < deadline:
        task = client.get(f"/tasks/{task_id}").json()
        auto = (task.get("metrics") or {}).get("auto", {})
        events = client.get(f"/tasks/{task_id}/events").json()["items"]
        if method in auto.get("running", []) and any(e["data"].get("candidate") == method
                                                     and e["data"]["candidate_epoch"] >= epoch for e in events):
            return task
        if task["status"] in {"succeeded", "failed"}:
            break
        time.sleep(0.1)
    raise AssertionError(f"{method} of task {task_id} did not reach epoch {epoch}: {task}")


def start_ready_worker(stack, name: str):
    """A worker that consumes already, so that a test knows which workers share the messages."""
    worker = stack.start_worker(name)
    wait_until(lambda: " ready." in worker.log.read_text(errors="replace") or not worker.alive(), f"{name} ready",
               timeout=120)
    assert worker.alive(), worker.tail()
    return worker


def epoch_events(client, task_id: str) -> list[dict]:
    events = client.get(f"/tasks/{task_id}/events").json()["items"]
    return sorted((e for e in events if e["kind"] == "epoch"), key=lambda e: e["epoch"])


def check_winner(done: dict, candidates: list[str]) -> list[dict]:
    """The task's result: every candidate on the leaderboard once, on one split, the winner auto's rule's
    (upt.auto.pick_winner, tested against the rule written out in tests/core/test_auto.py)."""
    auto = done["metrics"]["auto"]
    board = auto["leaderboard"]
    assert [row["method"] for row in board] == candidates  # each candidate once
    best = pick_winner([LeaderboardRow.from_dict(row) for row in board])
    assert auto["winner"] == best.method and done["metrics"]["val_accuracy"] == best.val_accuracy
    assert {row["val_count"] for row in board} == {auto["val_count"]}  # one split for all
    return board


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
        assert running["metrics"]["auto"]["running"] == ["coop"]
        assert 0 < running["progress"] < 1 and running["eta_s"] is not None
    finally:
        first.kill_group()
    # Recovery gives the dead worker's candidate back to the queue; the task itself keeps its state.
    lost = wait_until(lambda: (a := auto_of(client, task_id)) and "coop" in a.get("queued", []) and a,
                      "coop queued again", timeout=30)
    assert lost["running"] == [] and client.get(f"/tasks/{task_id}").json()["status"] == "running"
    second = stack.start_worker("worker-auto-resumed")
    try:
        done = wait_for(client, task_id, {"succeeded", "failed"}, timeout=300)
    finally:
        second.stop()
    assert done["status"] == "succeeded", (done, second.tail())
    assert done["attempts"] == 2  # the most any candidate took
    board = check_winner(done, CANDIDATES)
    assert done["metrics"]["auto"]["val_count"] == 16 and {row["val_count"] for row in board} == {16}
    events = client.get(f"/tasks/{task_id}/events").json()["items"]
    finished = sorted((e for e in events if e["kind"] == "candidate"), key=lambda e: e["epoch"])
    assert [e["data"]["method"] for e in finished] == CANDIDATES
    assert [e["attempt"] for e in finished] == [1, 2, 1]  # only coop was trained again, once
    epochs = epoch_events(client, task_id)
    assert [e["epoch"] for e in epochs] == list(range(1, 17))  # numbered in the order written
    for method in ("coop", "vpt-shallow"):  # each epoch of each candidate once
        assert sorted(e["data"]["candidate_epoch"] for e in epochs if e["data"]["candidate"] == method) == \
            list(range(1, 9))
    artifact_config = client.get(f"/tasks/{task_id}/artifact")
    assert artifact_config.status_code == 200
    assert client.delete(f"/tasks/{task_id}").status_code == 204


@pytest.fixture(scope="module")
def two_workers(stack):
    workers = [start_ready_worker(stack, f"worker-auto-{n}") for n in (1, 2)]
    # Warm-up: each idle worker reserves one of the two messages, so both pool processes have loaded the
    # backbone and trained once; on a loaded machine a cold one starts its first training many seconds late.
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="auto", candidates="tip-adapter,coop", shots=2, epochs=1, seed=9)
    warm = client.post("/tasks", data=data, files=files).json()["id"]
    assert wait_for(client, warm, {"succeeded", "failed"}, timeout=300)["status"] == "succeeded"
    assert client.delete(f"/tasks/{warm}").status_code == 204
    yield workers
    for worker in workers:
        worker.stop()


def test_two_workers_share_the_candidates_of_an_auto_task(stack, two_workers):
    client = stack.client("acme")
    candidates = ["coop", "vpt-shallow", "tip-adapter-f", "tip-adapter"]
    data, files = task_form(per_class=8, method="auto", candidates=",".join(candidates), shots=4, epochs=12,
                            batch_size=2, seed=3)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    done = wait_for(client, task_id, {"succeeded", "failed"}, timeout=300)
    assert done["status"] == "succeeded", (done, [w.tail() for w in two_workers])
    check_winner(done, candidates)
    events = client.get(f"/tasks/{task_id}/events").json()["items"]
    finished = {e["data"]["method"]: e for e in events if e["kind"] == "candidate"}
    assert sorted(finished) == sorted(candidates) and {e["attempt"] for e in finished.values()} == {1}
    trained_by = {e["data"]["worker"] for e in finished.values()}
    assert len(trained_by) == 2, trained_by  # the events say which worker trained which candidate
    for epoch in epoch_events(client, task_id):  # every epoch event names its candidate's worker
        assert epoch["data"]["worker"] == finished[epoch["data"]["candidate"]]["data"]["worker"]
    # Both workers trained at once: the epochs of two candidates of different workers interleave in the
    # order they were written (the events' numbers, see task_state.record_candidate_progress).
    spans: dict[str, list[int]] = {}
    for event in epoch_events(client, task_id):
        spans.setdefault(event["data"]["candidate"], []).append(event["epoch"])
    assert any(min(spans[a]) < max(spans[b]) and min(spans[b]) < max(spans[a])
               for a in spans for b in spans if finished[a]["data"]["worker"] != finished[b]["data"]["worker"]), spans
    assert client.get(f"/tasks/{task_id}/artifact").status_code == 200
    assert client.delete(f"/tasks/{task_id}").status_code == 204


def test_cancel_stops_every_running_candidate(stack, two_workers):
    client = stack.client("acme")
    data, files = task_form(per_class=8, method="auto", candidates="coop,vpt-shallow,vpt-deep", shots=4,
                            epochs=200, batch_size=2, seed=4)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    wait_until(lambda: len(auto_of(client, task_id).get("running", [])) == 2, "two candidates running", timeout=120)
    wait_until(lambda: len({e["data"]["candidate"] for e in epoch_events(client, task_id)}) == 2,
               "both have trained an epoch", timeout=120)
    assert client.post(f"/tasks/{task_id}/cancel").status_code == 202
    done = wait_for(client, task_id, {"cancelled", "failed", "succeeded"}, timeout=60)
    assert done["status"] == "cancelled", done
    assert done["metrics"]["auto"]["running"] == []
    count = len(epoch_events(client, task_id))
    time.sleep(2)
    assert len(epoch_events(client, task_id)) == count  # nothing trains any more
    # The workers are free again: a new task's candidates are taken at once.
    data, files = task_form(per_class=4, method="auto", candidates="tip-adapter", shots=2, seed=5)
    again = client.post("/tasks", data=data, files=files).json()["id"]
    assert wait_for(client, again, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    for task in (task_id, again):
        assert client.delete(f"/tasks/{task}").status_code == 204


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


def test_delete_of_a_running_auto_task_stops_its_candidates(stack, two_workers):
    client = stack.client("acme")
    data, files = task_form(per_class=8, method="auto", candidates="coop,vpt-shallow", shots=4, epochs=200,
                            batch_size=2, seed=6)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]
    wait_until(lambda: len(auto_of(client, task_id).get("running", [])) == 2, "two candidates running", timeout=120)
    assert client.delete(f"/tasks/{task_id}").status_code == 204
    assert client.get(f"/tasks/{task_id}").status_code == 404
    # Both workers stop their candidate and are free again: two candidates of a new task run at once.
    data, files = task_form(per_class=8, method="auto", candidates="coop,vpt-shallow", shots=4, epochs=3,
                            batch_size=2, seed=7)
    again = client.post("/tasks", data=data, files=files).json()["id"]
    assert wait_for(client, again, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    workers = {e["data"]["worker"] for e in client.get(f"/tasks/{again}/events").json()["items"]
               if e["kind"] == "candidate"}
    assert len(workers) == 2, workers
    assert client.delete(f"/tasks/{again}").status_code == 204
