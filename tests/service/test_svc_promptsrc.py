"""PromptSRC through real HTTP and a real worker: its options stored and applied, its artifact (deep
prompts in both towers, aggregated over the epochs) served by /classify as `upt predict` serves it."""

from __future__ import annotations


import pytest

from svc_helpers import assert_served_as_upt_predicts, images, task_form, wait_for

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_a_promptsrc_task_trains_with_its_options_and_classify_serves_its_artifact(stack, tmp_path):
    client = stack.client(stack.new_tenant("promptsrc"))
    worker = stack.start_worker()
    try:
        options = {"shots": 2, "epochs": 2, "seed": 3, "gpa_mean": 2.0, "gpa_std": 1.0, "text_loss_weight": 5.0}
        data, files = task_form(per_class=4, method="promptsrc", **options)
        created = client.post("/tasks", data=data, files=files)
        assert created.status_code == 202, created.text
        task = created.json()
        assert all(task["config"][name] == value for name, value in options.items()), task["config"]
        done = wait_for(client, task["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", (done, worker.tail())
        assert done["epoch"] == 2

        test_images = images("test", 2)
        classify = client.post("/classify", data={"task_id": task["id"], "top_k": "3", "stage": "tuned"},
                               files=[("files", (p.name, p.read_bytes(), "image/png")) for _, p in test_images])
        assert classify.status_code == 200, classify.text
        served = classify.json()["predictions"]

        config = assert_served_as_upt_predicts(client, task["id"], served, test_images, tmp_path, top_k=3,
                                               pretrained=stack.env["UPT_PRETRAINED"])
        assert config["method"] == "promptsrc"
        assert config["regulation"] == {"text_loss_weight": 5.0, "image_loss_weight": 10.0, "gpa_mean": 2.0,
                                        "gpa_std": 1.0}
        assert client.delete(f"/tasks/{task['id']}").status_code == 204
    finally:
        worker.stop()
