"""GET /tasks/{id}/export: the task's model as ONNX (or OpenVINO IR, zipped), tenant-scoped, refused
until the task has succeeded, written once per artifact; ONNX Runtime's top-1 equals /classify's."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from svc_helpers import images, settings_of, task_form, wait_for

ort = pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(stack):
    worker = stack.start_worker("export-worker")
    try:
        client = stack.client("acme")
        data, files = task_form(per_class=2, method="vpt-deep", shots=2, epochs=1, depth=2)
        created = client.post("/tasks", data=data, files=files)
        assert created.status_code == 202, created.text
        task = wait_for(client, created.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert task["status"] == "succeeded", worker.tail()
        yield task
    finally:
        worker.stop()


def _pixels(path, size: int) -> torch.Tensor:
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                           T.ToTensor()])
    return transform(Image.open(path).convert("RGB"))


def _held_out() -> list:
    return [path for _, path in images("test", 1000)]  # all of them (47)


def _classified_top_1(client, task_id: str, paths: list) -> list[str]:
    answer = client.post("/classify", data={"task_id": task_id},
                         files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths]).json()
    assert answer["stage"] == "tuned"
    return [p["labels"][0]["label"] for p in answer["predictions"]]


def test_the_onnx_export_gives_classifys_top_1_and_is_written_once(stack, trained):
    client = stack.client("acme")
    held_out = _held_out()
    assert trained["links"]["export"] == f"/tasks/{trained['id']}/export"
    answered = client.get(trained["links"]["export"], params={"format": "onnx"})
    assert answered.status_code == 200, answered.text
    assert answered.headers["content-type"] == "application/octet-stream"
    assert f'upt-{trained["id"]}.onnx' in answered.headers["content-disposition"]
    session = ort.InferenceSession(answered.content, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["class_names"]) == trained["class_names"] and metadata["method"] == "vpt-deep"
    size = int(metadata["image_size"])
    logits, = session.run(["logits"], {"pixels": torch.stack([_pixels(p, size) for p in held_out]).numpy()})
    exported = [trained["class_names"][i] for i in logits.argmax(axis=1)]
    assert exported == _classified_top_1(client, trained["id"], held_out)

    exports = settings_of(stack.env).storage_dir / "tasks" / trained["id"] / "exports"
    written, = exports.rglob("*.onnx")
    stamp = written.stat().st_mtime_ns
    assert client.get(f"/tasks/{trained['id']}/export", params={"format": "openvino"}).status_code == 200
    again = client.get(f"/tasks/{trained['id']}/export")  # onnx is the default
    # Served, not exported again, and kept beside the other format's export of the same artifact.
    assert again.content == answered.content and written.stat().st_mtime_ns == stamp
    assert [len(list(exports.rglob(pattern))) for pattern in ("*.onnx", "*.zip")] == [1, 1]


def test_the_openvino_export_is_a_zip_of_its_xml_and_bin_giving_classifys_top_1(stack, trained, tmp_path):
    ov = pytest.importorskip("openvino")
    client = stack.client("acme")
    answered = client.get(f"/tasks/{trained['id']}/export", params={"format": "openvino"})
    assert answered.status_code == 200, answered.text
    assert answered.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(answered.content))
    assert sorted(archive.namelist()) == ["model.bin", "model.xml"]
    archive.extractall(tmp_path)
    model = ov.Core().read_model(tmp_path / "model.xml")
    assert json.loads(model.get_rt_info(["upt", "class_names"]).astype(str)) == trained["class_names"]
    size = int(model.get_rt_info(["upt", "image_size"]).astype(str))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    held_out = _held_out()
    logits = compiled([torch.stack([_pixels(p, size) for p in held_out]).numpy()])["logits"]
    exported = [trained["class_names"][i] for i in logits.argmax(axis=1)]
    assert exported == _classified_top_1(client, trained["id"], held_out)


def test_export_problems(stack, trained):
    acme, globex = stack.client("acme"), stack.client("globex")
    unknown = acme.get(f"/tasks/{trained['id']}/export", params={"format": "tflite"})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "format"
    assert unknown.headers["content-type"].startswith("application/problem+json")
    assert globex.get(f"/tasks/{trained['id']}/export").status_code == 404  # another tenant's task is none
    data, files = task_form(per_class=2, method="coop", shots=2, epochs=50)
    busy = acme.post("/tasks", data=data, files=files).json()
    try:
        refused = acme.get(f"/tasks/{busy['id']}/export")
        assert refused.status_code == 409 and refused.json()["type"].endswith("task-not-finished")
    finally:
        acme.delete(f"/tasks/{busy['id']}")
