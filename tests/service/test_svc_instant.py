"""The instant stage: a task answers /classify from its training-free cache before any worker takes it,
and from its trained prompts once it has succeeded."""

from __future__ import annotations

import shutil

import pytest

from svc_helpers import classify_with_task as classify, task_form, wait_for, wait_for_stage

pytestmark = [pytest.mark.service, pytest.mark.slow]


def published(stack, task_id: str):
    """The task's published instant stage: one folder, named by its build (the row says which)."""
    folder, = (stack.tmp / "data" / "storage" / "tasks" / task_id).glob("instant-*")
    return folder


def test_a_task_answers_before_any_worker_and_switches_stage_when_trained(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="coop", shots=2, epochs=3, batch_size=4)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    assert created.json()["stages"]["tuned"]["state"] == "queued"

    # No worker runs: the queue cannot move, yet the task answers.
    task = wait_for_stage(client, task_id, "instant", {"ready", "failed"})
    instant = task["stages"]["instant"]
    assert instant["state"] == "ready", (instant, stack.api.tail())
    assert instant["method"] == "gda" and 0.0 <= instant["val_accuracy"] <= 1.0  # UPT_INSTANT_METHOD's default
    assert task["status"] == "queued"
    answered = classify(client, task_id)
    assert answered.status_code == 200, answered.text
    assert answered.json()["stage"] == "instant" and len(answered.json()["predictions"][0]["labels"]) == 4
    pinned = classify(client, task_id, stage="tuned")
    assert pinned.status_code == 409 and pinned.json()["type"].endswith("task-not-finished")
    assert classify(client, task_id, stage="later").status_code == 422

    # The instant stage's folder lost (a volume restored from a backup): built on demand.
    shutil.rmtree(published(stack, task_id))
    rebuilt = classify(client, task_id)
    assert rebuilt.status_code == 200 and rebuilt.json()["stage"] == "instant"
    assert rebuilt.json()["predictions"] == answered.json()["predictions"]  # the same cache again

    worker = stack.start_worker()
    try:
        done = wait_for(client, task_id, {"succeeded", "failed"})
        assert done["status"] == "succeeded", worker.tail()
    finally:
        worker.stop()
    assert done["stages"]["tuned"] == {"state": "ready", "method": "coop",
                                       "val_accuracy": done["metrics"]["val_accuracy"], "error": None}
    assert done["stages"]["instant"]["state"] == "ready"
    assert classify(client, task_id).json()["stage"] == "tuned"
    assert classify(client, task_id, stage="instant").json()["stage"] == "instant"
    assert client.delete(f"/tasks/{task_id}").status_code == 204


def test_a_stage_left_building_by_a_dead_api_is_resumed_without_a_classify(stack):
    """The API process that was building a stage died: the row says `building` and no artifact was
    published. The sweeper builds it again, so the task becomes classifiable without anyone asking."""
    import psycopg

    client = stack.client("acme")
    data, files = task_form(per_class=4, method="coop", shots=2, epochs=3)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]
    assert wait_for_stage(client, task_id, "instant", {"ready", "failed"})["stages"]["instant"]["state"] == "ready"

    url = stack.env["UPT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:  # what a build interrupted by a crash leaves
        conn.execute("UPDATE tasks SET instant_status = 'building', instant_accuracy = NULL WHERE id = %s", (task_id,))
    shutil.rmtree(published(stack, task_id))
    assert client.get(f"/tasks/{task_id}").json()["stages"]["instant"]["state"] == "building"

    task = wait_for_stage(client, task_id, "instant", {"ready", "failed"}, timeout=60)  # GET only, no /classify
    assert task["stages"]["instant"]["state"] == "ready", (task, stack.api.tail())
    assert (published(stack, task_id) / "adapter_config.json").is_file()
    assert "resuming the instant stage" in stack.api.tail(400)
    assert client.delete(f"/tasks/{task_id}").status_code == 204


def test_a_cancelled_training_keeps_its_instant_stage(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="vpt-shallow", shots=2, epochs=50)
    task_id = client.post("/tasks", data=data, files=files).json()["id"]
    assert client.post(f"/tasks/{task_id}/cancel").json()["status"] == "cancelled"  # no worker: at once
    task = wait_for_stage(client, task_id, "instant", {"ready", "failed"})
    assert task["status"] == "cancelled" and task["stages"]["tuned"]["state"] == "cancelled"
    answered = classify(client, task_id)
    assert answered.status_code == 200 and answered.json()["stage"] == "instant"
    assert client.delete(f"/tasks/{task_id}").status_code == 204


def test_a_tip_adapter_f_task_trains_in_a_worker_and_serves_its_cache(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="tip-adapter-f", shots=2, epochs=3)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text  # no prompts to check against the backbone
    worker = stack.start_worker()
    try:
        done = wait_for(client, created.json()["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", worker.tail()
    finally:
        worker.stop()
    assert done["metrics"]["trainable_parameters"] == 8 * 64 and done["epoch"] == 3  # 8 keys of width 64
    assert {"alpha", "beta"} <= set(done["metrics"]["cache"])
    answered = classify(client, done["id"])
    assert answered.status_code == 200 and answered.json()["stage"] == "tuned"
    assert client.delete(f"/tasks/{done['id']}").status_code == 204
