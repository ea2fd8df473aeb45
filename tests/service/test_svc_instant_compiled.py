"""The instant stage of an API that serves with OpenVINO: its Tip-Adapter cache (UPT_INSTANT_METHOD, not
the default GDA: the cache's keys are the encoder's features themselves) is encoded by the compiled
encoder (service/instant.py), and with exact fp32 it is the cache that the PyTorch tower builds from the
same stored shots, to float rounding."""

from __future__ import annotations

import httpx
import pytest
import torch

from svc_helpers import api_process, base_env, classify_with_task, settings_of, task_form, wait_for_stage, wait_until

pytest.importorskip("openvino")
pytestmark = pytest.mark.slow


def test_an_openvino_api_encodes_the_instant_stage_with_its_compiled_encoder(tmp_path, tiny_checkpoint):
    from service.storage import Storage
    from upt.artifact import load_artifact
    from upt.backbone import load_backbone
    from upt.training import TrainConfig, train

    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_SERVE_RUNTIME="openvino", UPT_SERVE_PRECISION="fp32",
                   UPT_INSTANT_AUGMENT_VIEWS="3", UPT_INSTANT_METHOD="tip-adapter")
    with api_process(env, tmp_path / "serve.log") as url:
        encoder = wait_until(lambda: (detail := httpx.get(f"{url}/readyz", timeout=30).json()
                                      ["checks"]["image_encoder"]["detail"]).startswith("openvino") and detail,
                             "served by OpenVINO", timeout=180)
        assert encoder.startswith("openvino fp32 on cpu"), encoder
        data, files = task_form(per_class=4, method="coop", epochs=1)
        with httpx.Client(base_url=url, timeout=120) as client:
            task_id = client.post("/tasks", data=data, files=files).json()["id"]
            instant = wait_for_stage(client, task_id, "instant", {"ready", "failed"}, timeout=180)["stages"]["instant"]
            assert instant["state"] == "ready", instant
            answer = classify_with_task(client, task_id, stage="instant")
        assert answer.status_code == 200 and answer.json()["stage"] == "instant", answer.text

    storage = Storage.from_settings(settings_of(env))
    published, = storage.task_dir(task_id).glob("instant-*")  # the one build, under the name its row holds
    served = load_artifact(published)
    config = TrainConfig.from_dict(served.config["train"])
    rebuilt = train(load_backbone("upt-tiny", str(tiny_checkpoint), "cpu"), storage.data_dir(task_id), config,
                    tmp_path / "pytorch", class_folders=storage.task_class_folders(task_id, len(config.class_names)))
    expected = load_artifact(rebuilt.artifact_dir).tensors
    assert config.method == "tip-adapter" and served.config["cache"]["augment_views"] == 3
    torch.testing.assert_close(served.tensors["cache_keys"], expected["cache_keys"], atol=1e-5, rtol=0)
    assert torch.equal(served.tensors["cache_values"], expected["cache_values"])
