"""upt.client.Client and `upt remote` against a real API (`upt serve --no-worker` and a worker):
create from a folder or a zip, wait with a progress bar, classify paths, PIL images and bytes, and
errors that carry the problem document."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest
from PIL import Image

from svc_helpers import CLASSES, images, zip_of_classes
from upt.cli import main as upt_main
from upt.client import ApiError, Client, TaskFailedError

pytestmark = [pytest.mark.service, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker(stack):
    proc = stack.start_worker("client-worker")
    yield proc
    proc.stop()


@pytest.fixture
def photos(tmp_path):
    """An ImageFolder of two training images per class, as a user has them on disk."""
    for name, path in images("train", 2):
        (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "photos" / name / path.name)
    return tmp_path / "photos"


def test_a_task_from_a_folder_is_created_waited_for_and_classifies(stack, worker, photos, capsys):
    with Client(stack.url, stack.keys["acme"]) as client:
        task = client.create_task(photos, method="coop", shots=2, epochs=2)
        assert task["class_names"] == CLASSES and task["num_images"] == 2 * len(CLASSES)
        done = client.wait(task["id"], timeout=300)
        assert done["status"] == "succeeded" and done["progress"] == 1.0
        assert "100%" in capsys.readouterr().err  # the progress bar, finished
        (label, path), = images("test", 1)[:1]
        answer = client.classify([path, Image.open(path), path.read_bytes()], task_id=task["id"], top_k=2)
        assert answer["stage"] == "tuned" and answer["class_names"] == CLASSES
        assert [p["filename"] for p in answer["predictions"]] == [path.name, "image-2.png", "image-3"]
        tops = [[label["label"] for label in p["labels"]] for p in answer["predictions"]]
        assert len(tops[0]) == 2 and tops[0] == tops[1] == tops[2]  # one image, three ways of sending it
        artifact = zipfile.ZipFile(io.BytesIO(client.artifact(task["id"])))
        assert any(name.endswith("adapter_config.json") for name in artifact.namelist())
        assert any(t["id"] == task["id"] for t in client.tasks(status=["succeeded"]))


def test_a_task_from_a_zip(stack, worker, tmp_path):
    archive = tmp_path / "fashion.zip"
    archive.write_bytes(zip_of_classes(2))
    with Client(stack.url, stack.keys["acme"]) as client:
        done = client.wait(client.create_task(archive, method="zero-shot")["id"], timeout=300, progress=False)
        assert done["status"] == "succeeded" and done["class_names"] == CLASSES


def test_errors_raise_with_the_problem_document(stack, photos):
    with Client(stack.url, stack.keys["acme"]) as client:
        with pytest.raises(ApiError) as missing:
            client.task("a" * 32)
        assert missing.value.status == 404 and missing.value.title == "Not found"
        assert missing.value.problem["type"].endswith("not-found") and "does not exist" in missing.value.detail
        with pytest.raises(ApiError) as invalid:
            client.create_task(photos, method="no-such-method")
        assert invalid.value.status == 422 and invalid.value.errors[0]["field"] == "method"
        with pytest.raises(ApiError) as not_finished:
            client.export(client.create_task(photos, method="coop", epochs=50)["id"])
        assert not_finished.value.status == 409
    with Client(stack.url, "not-a-key") as stranger, pytest.raises(ApiError) as unauthorized:
        stranger.task("a" * 32)
    assert unauthorized.value.status == 401 and unauthorized.value.problem["title"] == "Unauthorized"


def test_wait_raises_when_the_task_ends_without_succeeding(stack, photos):
    with Client(stack.url, stack.keys["acme"]) as client:
        task = client.create_task(photos, method="coop", epochs=50)
        client.cancel(task["id"])
        with pytest.raises(TaskFailedError) as ended:
            client.wait(task["id"], timeout=120, progress=False)
        assert ended.value.task["status"] == "cancelled" and task["id"] in str(ended.value)


def test_upt_remote_commands(stack, worker, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UPT_URL", stack.url)
    monkeypatch.setenv("UPT_API_KEY", stack.keys["acme"])
    assert upt_main(["remote", "create", "--data", str(photos), "--method", "zero-shot", "--wait", "--json"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert task["status"] == "succeeded"
    assert upt_main(["remote", "status", task["id"]]) == 0
    assert f"task {task['id']}: succeeded" in capsys.readouterr().out
    (_, path), = images("test", 1)[:1]
    assert upt_main(["remote", "classify", "--task", task["id"], str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["filename"] == path.name
    assert upt_main(["remote", "export", task["id"], "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0
    capsys.readouterr()
    assert upt_main(["remote", "status", "a" * 32, "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["problem"]["status"] == 404 and "404 Not found" in captured.err
