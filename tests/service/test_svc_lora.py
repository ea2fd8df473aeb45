"""A CLIP-LoRA task through the service: the worker trains it (iterations grouped into epochs), and its
tuned stage answers /classify with the adapted image tower, as `upt predict` does on its artifact."""

from __future__ import annotations


import pytest

from svc_helpers import assert_served_as_upt_predicts, images, task_form, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_a_clip_lora_task_trains_and_its_tuned_stage_answers_classify(stack, tmp_path):
    client = stack.client("acme")
    data, files = task_form(per_class=4, method="clip-lora", shots=2, iterations=4, batch_size=4)
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    worker = stack.start_worker()
    try:
        done = wait_for(client, task_id, {"succeeded", "failed"})
        assert done["status"] == "succeeded", (done, worker.tail())
    finally:
        worker.stop()
    # 4 classes x 2 shots at batch 4: two iterations an epoch, so the 4 iterations make 2 epochs
    assert (done["epoch"], done["epochs"], done["progress"]) == (2, 2, 1.0)
    assert [e["epoch"] for e in client.get(f"/tasks/{task_id}/events").json()["items"]] == [1, 2]
    assert done["stages"]["tuned"]["method"] == "clip-lora" and done["metrics"]["iterations"] == 4

    test_images = images("test", 2)
    answer = client.post("/classify", data={"task_id": task_id, "stage": "tuned", "top_k": "4"},
                         files=[("files", (p.name, p.read_bytes(), "image/png")) for _, p in test_images])
    assert answer.status_code == 200, answer.text
    assert answer.json()["stage"] == "tuned"
    served = answer.json()["predictions"]

    assert_served_as_upt_predicts(client, task_id, served, test_images, tmp_path, top_k=4,
                                  pretrained=stack.env["UPT_PRETRAINED"])
    assert client.delete(f"/tasks/{task_id}").status_code == 204
