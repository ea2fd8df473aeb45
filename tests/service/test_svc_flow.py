"""The whole flow through real HTTP: PostgreSQL, Redis, uvicorn and a real celery worker process."""

from __future__ import annotations

import time

import pytest

from svc_helpers import CLASSES, assert_served_as_upt_predicts, images, task_form, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


def metric(text: str, name: str) -> float:
    """The value of one sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def test_create_train_classify_cancel_delete(stack, tmp_path):
    # A tenant of its own: the task list below must hold only this test's tasks, whatever ran before.
    client = stack.client(stack.new_tenant("flow"))
    worker = stack.start_worker()
    try:
        data, files = task_form(per_class=4, method="coop", shots=2, epochs=2, seed=3, batch_size=4)
        created = client.post("/tasks", data=data, files=files)
        assert created.status_code == 202, created.text
        task = created.json()
        assert created.headers["location"] == f"/tasks/{task['id']}"
        assert task["status"] == "queued" and task["class_names"] == CLASSES and task["num_images"] == 16

        done = wait_for(client, task["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", (done, worker.tail())
        assert done["progress"] == 1.0 and done["epoch"] == 2 and done["attempts"] == 1
        assert set(done["metrics"]) >= {"val_accuracy", "per_class_accuracy", "confusion_matrix"}
        assert 0.0 <= done["metrics"]["val_accuracy"] <= 1.0

        events = client.get(f"/tasks/{task['id']}/events").json()["items"]
        assert [e["epoch"] for e in events] == [1, 2]
        assert all(e["data"]["loss"] > 0 for e in events)

        batches_before = metric(client.get("/metrics").text, "upt_classify_batch_size_count")
        # Classify equals `upt predict` on the downloaded artifact and the same images.
        test_images = images("test", 2)
        classify = client.post("/classify", data={"task_id": task["id"], "top_k": "3"},
                               files=[("files", (p.name, p.read_bytes(), "image/png")) for _, p in test_images])
        assert classify.status_code == 200, classify.text
        served = classify.json()["predictions"]
        assert len(served) == len(test_images) and all(len(p["labels"]) == 3 for p in served)

        assert_served_as_upt_predicts(client, task["id"], served, test_images, tmp_path, top_k=3,
                                      pretrained=stack.env["UPT_PRETRAINED"])

        # Cancel another task while it trains (or before it starts): it ends cancelled.
        data, files = task_form(per_class=8, method="vpt-shallow", shots=8, epochs=50, batch_size=2)
        other = client.post("/tasks", data=data, files=files).json()
        wait_for(client, other["id"], {"running"})
        cancel = client.post(f"/tasks/{other['id']}/cancel")
        assert cancel.status_code == 202 and cancel.json()["status"] in {"cancelling", "cancelled"}
        cancelled = wait_for(client, other["id"], {"cancelled", "succeeded", "failed"}, timeout=30)
        assert cancelled["status"] == "cancelled" and cancelled["epoch"] < 50
        assert client.post(f"/tasks/{other['id']}/cancel").status_code == 409
        for stage, status in (("tuned", 409), ("instant", 200)):  # a cancelled training keeps its instant stage
            assert client.post("/classify", data={"task_id": other["id"], "stage": stage},
                               files=[("files", ("a.png", test_images[0][1].read_bytes(), "image/png"))]
                               ).status_code == status

        # Deleting a task while it trains stops the training and leaves no files behind.
        data, files = task_form(per_class=8, method="coop", shots=8, epochs=50, batch_size=2)
        doomed = client.post("/tasks", data=data, files=files).json()
        wait_for(client, doomed["id"], {"running"})
        doomed_dir = stack.tmp / "data" / "storage" / "tasks" / doomed["id"]
        assert doomed_dir.is_dir()
        assert client.delete(f"/tasks/{doomed['id']}").status_code == 204
        deadline = time.monotonic() + 15
        while doomed_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not doomed_dir.exists(), worker.tail()

        listed = client.get("/tasks", params={"status": "succeeded"}).json()["items"]
        assert [t["id"] for t in listed] == [task["id"]]

        # Delete removes the row, the uploads and the artifact.
        task_dir = stack.tmp / "data" / "storage" / "tasks" / task["id"]
        assert (task_dir / "artifact" / "adapter_config.json").is_file()
        assert client.delete(f"/tasks/{task['id']}").status_code == 204
        assert not task_dir.exists()
        assert client.get(f"/tasks/{task['id']}").status_code == 404
        assert client.get(f"/tasks/{task['id']}/artifact").status_code == 404

        metrics = client.get("/metrics").text
        assert metric(metrics, 'upt_tasks{status="cancelled"}') >= 1
        # Two answered: the trained task's, and the cancelled one's from its instant stage.
        assert metric(metrics, "upt_classify_batch_size_count") == batches_before + 2
        assert 'upt_http_requests_total{method="POST",route="/tasks",status="202"}' in metrics
        assert "upt_training_duration_seconds_count" in metrics
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"], ready.text
        client.delete(f"/tasks/{other['id']}")
    finally:
        worker.stop()
