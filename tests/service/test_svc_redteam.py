"""The red-team corpus: hostile inputs as a table (each answered by the 4xx that names its limit, never a
5xx), and faults as scripted scenarios, against an API in this process on SQLite with the tiny backbone.

A new finding goes in as a row of HOSTILE (an input) or as a scenario test (a fault, a race), so the
next round of hostile testing starts from every case found before.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from service.db import Database
from service.settings import Settings
from svc_helpers import CLASSES, images

PNG = images("train", 1)[0][1].read_bytes()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def image_files(*blobs: bytes) -> list:
    return [("files", (f"{index}.png", blob, "image/png")) for index, blob in enumerate(blobs)]


def task_data(**extra) -> dict:
    return {"class_names": CLASSES[:2], "labels": [CLASSES[0], CLASSES[1]], "method": "coop", "shots": "1",
            "epochs": "1", **extra}


@dataclass
class Api:
    client: object
    app: object
    headers: dict[str, str]
    other: dict[str, str]  # another tenant's key
    settings: Settings

    def post(self, path: str, headers: dict | None = None, **kwargs):
        return self.client.post(path, headers={**self.headers, **(headers or {})}, **kwargs)

    def task_ids(self) -> list[str]:
        return [t["id"] for t in self.client.get("/tasks", headers=self.headers).json()["items"]]


def make_api(tmp_path, tiny_checkpoint, **overrides) -> Iterator[Api]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key
    from service.db import Database
    from service.migrate import upgrade

    settings = Settings(**({"data_dir": tmp_path, "model": "upt-tiny", "pretrained": str(tiny_checkpoint),
                            "device": "cpu", "serve_runtime": "pytorch", "require_api_keys": True,
                            "instant_augment_views": 1} | overrides))
    upgrade(settings)
    database = Database.from_settings(settings)
    with database.scope() as session:
        keys = [create_key(session, "acme"), create_key(session, "globex")]
    database.dispose()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.app.state.serving.backbone()  # loaded before the first case, not inside its timing
        yield Api(client, client.app, {"Authorization": f"Bearer {keys[0]}"},
                  {"Authorization": f"Bearer {keys[1]}"}, settings)


@pytest.fixture
def api(tmp_path, tiny_checkpoint) -> Iterator[Api]:
    yield from make_api(tmp_path, tiny_checkpoint, max_request_pixels=1_200_000)


def add_task(api: Api, status: str = "running", tenant: str = "acme") -> str:
    """A task row of `tenant` (acme: the key of `api.headers`), as a worker left it: no uploads, no build."""
    from service.auth import get_or_create_tenant
    from service.models import Task, new_task_id, utcnow

    task_id = new_task_id()
    with api.app.state.database.scope() as session:
        session.add(Task(id=task_id, tenant_id=get_or_create_tenant(session, tenant).id, method="coop", config={},
                         class_names=CLASSES[:2], num_images=2, model="upt-tiny", pretrained="p", status=status,
                         heartbeat_at=utcnow()))
    return task_id


def assert_problem(response, status: int, *needles: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    for needle in needles:
        assert needle in body["detail"], (needle, body)
    return body


# --- hostile inputs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hostile:
    """One hostile request: what is sent, and the problem it must get (status, words of its detail)."""

    name: str
    path: str
    data: dict
    files: list = field(default_factory=list)
    status: int = 422
    needles: tuple[str, ...] = ()
    headers: dict = field(default_factory=dict)
    content: bytes | None = None
    method: str = "POST"


HOSTILE = [
    # Finding 1: a tiny, very wide image; preprocessing scales its short side up to the model's input.
    Hostile("classify a 2000x20 image", "/classify", {"class_names": CLASSES}, image_files(png(2000, 20)),
            422, ("UPT_MAX_IMAGE_ASPECT",)),
    Hostile("classify a 20x2000 image", "/classify", {"class_names": CLASSES}, image_files(png(20, 2000)),
            422, ("UPT_MAX_IMAGE_ASPECT",)),
    Hostile("classify a 1000000x1 PNG of 1 KB", "/classify", {"class_names": CLASSES},
            image_files(png(1_000_000, 1)), 422, ("UPT_MAX_IMAGE_ASPECT",)),
    Hostile("a task of 300000x1 images", "/tasks", task_data(), image_files(png(300_000, 1), PNG),
            422, ("UPT_MAX_IMAGE_ASPECT",)),
    # ... and the request's pixels counted as scaled to the model's input (32 for upt-tiny): twenty
    # 1000x50 images decode to 1 MP but scale to 20 x 32x640 more.
    Hostile("classify images whose scaled sizes pass the request's pixels", "/classify", {"class_names": CLASSES},
            image_files(*[png(1000, 50)] * 20), 413, ("UPT_MAX_REQUEST_PIXELS", "scaled")),
    # Finding 11: strict forms. An unknown field (a typo) trained with the default; lr unbounded.
    Hostile("a task with `epoch` for `epochs`", "/tasks", task_data(epoch="1"), image_files(PNG, PNG),
            422, ("'epoch'",)),
    Hostile("classify with `topk` for `top_k`", "/classify", {"class_names": CLASSES, "topk": "3"},
            image_files(PNG), 422, ("'topk'",)),
    Hostile("a task with lr 1e30", "/tasks", task_data(lr="1e30"), image_files(PNG, PNG), 422, ("lr",)),
    Hostile("a task with lr 1e308", "/tasks", task_data(lr="1e308"), image_files(PNG, PNG), 422, ("lr",)),
    # ... class names that differ by an invisible character, or read otherwise than they are.
    Hostile("classes `bag` and `bag` + a zero-width space", "/tasks",
            task_data(class_names=["bag", "bag\u200b"], labels=["bag", "bag\u200b"]), image_files(PNG, PNG),
            422, ("twice",)),
    Hostile("a class name with a bidi override", "/tasks",
            task_data(class_names=["bag", "\u202egab"], labels=["bag", "\u202egab"]), image_files(PNG, PNG),
            422, ("bidirectional",)),
    Hostile("a class name with a C1 control", "/tasks",
            task_data(class_names=["bag", "co\x85at"], labels=["bag", "co\x85at"]), image_files(PNG, PNG),
            422, ("control",)),
    Hostile("a class name of zero-width spaces only", "/tasks",
            task_data(class_names=["bag", "\u200b\u200b"], labels=["bag", "\u200b\u200b"]), image_files(PNG, PNG),
            422, ("class_names",)),
    Hostile("zero-shot class names of 60,000 characters", "/classify", {"class_names": ["a" * 60_000, "b" * 60_000]},
            image_files(PNG), 422, ("200 characters",)),
    Hostile("zero-shot classes that differ by a zero-width space", "/classify", {"class_names": ["bag", "bag\u200b"]},
            image_files(PNG), 422, ("twice",)),
    # Finding 9: numbers of a stream token beyond the database's integers (a traceback and a 500 each).
    Hostile("a stream token whose key id is past int4", "/tasks/{task}/events", {"token": "2147483648.1.x"},
            status=401, method="GET"),
    Hostile("a stream token whose key id is past int8", "/tasks/{task}/events",
            {"token": "99999999999999999999.1.x"}, status=401, method="GET"),
    Hostile("a stream token of 5000 digits", "/tasks/{task}/events", {"token": "9" * 190 + ".1.x"},
            status=401, method="GET"),
    # Finding 14: a Last-Event-ID past the integers: the stream closed at once, and EventSource reconnected for ever.
    Hostile("a Last-Event-ID past int8", "/tasks/{task}/events", {}, status=422, method="GET",
            headers={"Accept": "text/event-stream", "Last-Event-ID": "99999999999999999999.1"},
            needles=("Last-Event-ID",)),
    Hostile("an `after` past int4", "/tasks/{task}/events", {"after": "1.2147483648"}, status=422, method="GET",
            headers={"Accept": "text/event-stream"}, needles=("Last-Event-ID",)),
    # Finding 13: a declared size no request may have is a 413, not the tenant's storage quota (507).
    Hostile("a Content-Length of 99,999,999,999", "/tasks", {}, content=b"x", status=413,
            headers={"Content-Length": "99999999999", "Content-Type": "multipart/form-data; boundary=x"},
            needles=("UPT_MAX_UPLOAD_BYTES",)),
]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
def test_hostile_input_gets_the_problem_that_names_its_limit(api, case: Hostile):
    path = case.path.replace("{task}", add_task(api))
    before = api.task_ids()
    if case.method == "GET":
        response = api.client.get(path, headers={**api.headers, **case.headers}, params=case.data)
    elif case.content is not None:
        response = api.post(path, headers=case.headers, content=case.content)
    else:
        response = api.post(path, headers=case.headers, data=case.data, files=case.files)
    assert_problem(response, case.status, *case.needles)
    assert api.task_ids() == before  # nothing was created


def test_the_request_pixel_check_counts_scaled_pixels_within_the_limit(tmp_path, tiny_checkpoint):
    for api in make_api(tmp_path, tiny_checkpoint, max_request_pixels=1_450_000):
        # 20 x (50,000 decoded + 20,480 scaled) = 1.41 MP: within the limit, answered.
        response = api.post("/classify", data={"class_names": CLASSES}, files=image_files(*[png(1000, 50)] * 20))
        assert response.status_code == 200, response.text


# --- scenarios: faults and races ---------------------------------------------------------------------

def test_a_failure_in_preprocessing_is_a_4xx_not_a_500(api, monkeypatch):
    from upt.predict import Predictor

    def out_of_memory(self, images):
        raise MemoryError

    monkeypatch.setattr(Predictor, "preprocess", out_of_memory)
    assert_problem(api.post("/classify", data={"class_names": CLASSES}, files=image_files(PNG)), 413,
                   "UPT_MAX_IMAGE_PIXELS")

    def refuses(self, images):
        raise ValueError("bad mode")

    monkeypatch.setattr(Predictor, "preprocess", refuses)
    assert_problem(api.post("/classify", data={"class_names": CLASSES}, files=image_files(PNG)), 422, "0.png")


def test_images_over_the_request_pixels_are_refused_before_any_predictor_or_backbone_wait(api, monkeypatch):
    serving = api.app.state.serving
    calls: list[str] = []
    for name in ("zero_shot_predictor", "tuned_predictor", "backbone"):
        original = getattr(serving, name)
        monkeypatch.setattr(serving, name, lambda *a, _name=name, _original=original, **k: (
            calls.append(_name), _original(*a, **k))[1])
    big = image_files(*[png(2000, 2000)] * 2)  # 8 MP decoded: over the fixture's 1.2 MP
    assert_problem(api.post("/classify", data={"class_names": CLASSES}, files=big), 413, "UPT_MAX_REQUEST_PIXELS")
    assert "zero_shot_predictor" not in calls  # a 1,000-class text-encoder pass is not paid for a refusal
    calls.clear()
    data = {**task_data(), "labels": CLASSES[:2]}
    assert_problem(api.post("/tasks", data=data, files=big), 413, "UPT_MAX_REQUEST_PIXELS")
    assert calls == []  # not even the backbone's load was waited for


def test_a_file_size_limit_is_not_reported_as_a_full_volume(api, monkeypatch):
    import errno

    from service.api import tasks
    from service.errors import is_disk_full, is_file_too_large

    def too_large(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(tasks, "write_dataset", too_large)
    body = assert_problem(api.post("/tasks", data=task_data(), files=image_files(PNG, PNG)), 507, "EFBIG")
    assert body["type"].endswith("/file-size-limit")
    assert api.task_ids() == []
    # torch.save words a file-size limit as it words a full disk; the cause tells them apart.
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError as cause:
            raise RuntimeError("[enforce fail at inline_container.cc:1] . unexpected pos 64 vs 0") from cause
    except RuntimeError as error:
        assert is_file_too_large(error) and not is_disk_full(error)
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc:1] . unexpected pos 64 vs 0"))


@pytest.mark.parametrize("runtime", ["pytorch", "openvino"])
def test_an_int8_misconfiguration_serves_pytorch_and_takes_tasks(tmp_path, tiny_checkpoint, runtime):
    # int8 with the PyTorch runtime, or without calibration images: the README promises a PyTorch
    # fallback, and POST /tasks must not answer "set UPT_MODEL/UPT_PRETRAINED".
    for api in make_api(tmp_path, tiny_checkpoint, serve_precision="int8", serve_runtime=runtime):
        ready = api.client.get("/readyz").json()
        assert ready["checks"]["backbone"]["ok"], ready
        assert "Serving PyTorch instead" in ready["checks"]["image_encoder"]["detail"], ready
        created = api.post("/tasks", data=task_data(), files=image_files(PNG, PNG))
        assert created.status_code == 202, created.text
        assert api.post("/classify", data={"class_names": CLASSES}, files=image_files(PNG)).status_code == 200


def _revoke(api: Api, headers: dict) -> None:
    from sqlalchemy import update

    from service.auth import hash_key
    from service.models import ApiKey, utcnow

    key = headers["Authorization"].removeprefix("Bearer ")
    with api.app.state.database.scope() as session:
        session.execute(update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=utcnow()))


def test_a_stream_token_opens_one_stream(api):
    task_id = add_task(api)
    made = api.post(f"/tasks/{task_id}/events/token").json()
    assert api.client.get(made["url"]).status_code == 200
    assert_problem(api.client.get(made["url"]), 401, "already")
    # Each new token opens its own.
    again = api.post(f"/tasks/{task_id}/events/token").json()
    assert api.client.get(again["url"]).status_code == 200


def _end_task(api: Api, task_id: str) -> None:
    """The task succeeds: its open streams send `end` and close (a TestClient stream cannot be closed
    from the client's side while the server still writes to it)."""
    from sqlalchemy import update

    from service.models import Task

    with api.app.state.database.scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(status="succeeded"))


@pytest.mark.parametrize("by", ["header", "token"])
def test_a_revoked_keys_open_stream_closes_within_ten_seconds(api, by):
    import time

    task_id = add_task(api)  # running: its stream would stay open until it ends
    if by == "token":
        url, headers = api.post(f"/tasks/{task_id}/events/token").json()["url"], {}
    else:
        url, headers = f"/tasks/{task_id}/events", api.headers
    with api.client.stream("GET", url, headers={**headers, "Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("event: progress"):
            pass
        _revoke(api, api.headers)
        revoked = time.monotonic()
        try:
            rest = []
            for line in lines:  # until the server closes the stream, or a keep-alive after 10 s
                rest.append(line)
                if time.monotonic() - revoked > 10:
                    break
            took = time.monotonic() - revoked
        finally:
            _end_task(api, task_id)
    assert took < 10, f"the stream stayed open {took:.1f}s after its key was revoked"
    assert not any(line.startswith("event: end") for line in rest)  # closed, not "the task ended"


def test_event_streams_per_tenant_are_bounded(tmp_path, tiny_checkpoint):
    from svc_helpers import wait_until

    for api in make_api(tmp_path, tiny_checkpoint, tenant_max_streams=1):
        task_id = add_task(api)
        stream = {"Accept": "text/event-stream"}
        with api.client.stream("GET", f"/tasks/{task_id}/events", headers={**api.headers, **stream}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)
            # Were a second stream let in, it would last as long as the task: the task ends after 5 s.
            ending = threading.Timer(5, _end_task, (api, task_id))
            ending.start()
            second = api.client.get(f"/tasks/{task_id}/events", headers={**api.headers, **stream})
            ending.cancel()
            body = assert_problem(second, 429, "UPT_TENANT_MAX_STREAMS")
            assert body["type"].endswith("/tenant-stream-limit")
            # The history (JSON) is no stream; another tenant's streams are its own.
            assert api.client.get(f"/tasks/{task_id}/events", headers=api.headers).status_code == 200
            theirs = add_task(api, status="succeeded", tenant="globex")
            answer = api.client.get(f"/tasks/{theirs}/events", headers={**api.other, **stream})
            assert answer.status_code == 200 and "event: end" in answer.text
            _end_task(api, task_id)  # its stream says so and closes
            assert any(line.startswith("event: end") for line in lines)
        wait_until(lambda: api.app.state.streams.open_streams(1) == 0, "the closed stream's slot to come back", 15)
        again = api.client.get(f"/tasks/{task_id}/events", headers={**api.headers, **stream})
        assert again.status_code == 200 and "event: end" in again.text


# --- deletes, replicas and the instant stage ---------------------------------------------------------

def _delete_row(api: Api, task_id: str) -> None:
    from sqlalchemy import delete

    from service.models import Task

    with api.app.state.database.scope() as session:
        session.execute(delete(Task).where(Task.id == task_id))


def _created_without_instant_build(api: Api, monkeypatch) -> str:
    """A task created over HTTP whose instant stage nobody has started (the creating replica died)."""
    monkeypatch.setattr(api.app.state.instant, "schedule", lambda task_id: None)
    created = api.post("/tasks", data=task_data(), files=image_files(PNG, PNG))
    assert created.status_code == 202, created.text
    return created.json()["id"]


def test_classify_of_a_task_deleted_on_another_replica_is_a_404_never_a_500_or_409(api, monkeypatch):
    serving, storage = api.app.state.serving, api.app.state.storage
    # The artifact vanishes between the check that it is there and its reading (upt/artifact.py).
    task_id = add_task(api, status="succeeded")
    monkeypatch.setattr(storage, "has_artifact", lambda task: True)

    def deleted_while_reading(key, folder):
        _delete_row(api, task_id)
        raise FileNotFoundError(folder / "prompts.safetensors")

    monkeypatch.setattr(serving, "tuned_predictor", deleted_while_reading)
    assert_problem(api.post("/classify", data={"task_id": task_id}, files=image_files(PNG)), 404)
    # Succeeded, but the artifact is gone because the task is: not "its tuned stage answers once it has succeeded".
    task_id = add_task(api, status="succeeded")
    monkeypatch.setattr(storage, "has_artifact", lambda task: _delete_row(api, task_id) or False)
    assert_problem(api.post("/classify", data={"task_id": task_id, "stage": "tuned"}, files=image_files(PNG)), 404)


def test_classify_by_instant_stage_of_a_task_deleted_meanwhile_is_a_404(api, monkeypatch):
    from service.instant import InstantStages

    task_id = _created_without_instant_build(api, monkeypatch)
    monkeypatch.setattr(InstantStages, "_train_and_publish", lambda self, task, *args: _delete_row(api, task))
    assert_problem(api.post("/classify", data={"task_id": task_id}, files=image_files(PNG)), 404)


def test_replicas_build_a_tasks_instant_stage_once_and_publish_it_under_a_fresh_name(api, monkeypatch):
    import service.instant as instant_module
    from service.instant import InstantStages

    task_id = _created_without_instant_build(api, monkeypatch)
    state = api.app.state
    replicas = [state.instant, InstantStages(api.settings, state.storage, state.serving, state.database)]
    builds, original = [], instant_module.train
    barrier = threading.Barrier(2)

    def counted(*args, **kwargs):
        builds.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(instant_module, "train", counted)

    def classify_on(replica) -> None:
        barrier.wait()
        replica.ensure(task_id)

    threads = [threading.Thread(target=classify_on, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(builds) == 1, builds
    folders = sorted(p.name for p in state.storage.task_dir(task_id).iterdir() if p.name.startswith("instant"))
    assert len(folders) == 1 and folders[0].startswith("instant-"), folders
    answer = api.post("/classify", data={"task_id": task_id}, files=image_files(PNG))
    assert answer.status_code == 200 and answer.json()["stage"] == "instant", answer.text


def test_an_instant_stage_that_found_the_volume_full_is_built_again(api, monkeypatch):
    import errno

    import service.instant as instant_module

    task_id = _created_without_instant_build(api, monkeypatch)
    original = instant_module.train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(instant_module, "train", full)
    api.app.state.instant.build(task_id)
    stage = api.client.get(f"/tasks/{task_id}", headers=api.headers).json()["stages"]["instant"]
    assert stage["state"] != "failed" and "space" in stage["error"], stage
    assert_problem(api.post("/classify", data={"task_id": task_id}, files=image_files(PNG)), 507)
    monkeypatch.setattr(instant_module, "train", original)  # space was freed
    answer = api.post("/classify", data={"task_id": task_id}, files=image_files(PNG))
    assert answer.status_code == 200 and answer.json()["stage"] == "instant", answer.text


# --- quotas ------------------------------------------------------------------------------------------

def creates_released_together(api, monkeypatch, count: int) -> list:
    """`count` POST /tasks at once, each held after the checks made before its body is read until all are
    there: the race a quota checked only then loses. Their answers, in the order they came."""
    from service.api import tasks

    monkeypatch.setattr(api.app.state.instant, "schedule", lambda task_id: None)
    released, original = threading.Barrier(count, timeout=60), tasks.write_dataset

    def together(*args, **kwargs):
        released.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks, "write_dataset", together)
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(
        api.post("/tasks", data=task_data(), files=image_files(PNG, PNG)))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


@pytest.mark.parametrize("limit", ["tasks", "bytes"])
def test_quotas_hold_against_creates_released_together(tmp_path, tiny_checkpoint, monkeypatch, limit):
    one_task = None
    for api in make_api(tmp_path / "probe", tiny_checkpoint):  # what one task of this form keeps
        monkeypatch.setattr(api.app.state.instant, "schedule", lambda task_id: None)
        created = api.post("/tasks", data=task_data(), files=image_files(PNG, PNG)).json()
        with api.app.state.database.scope() as session:
            from service.models import Task
            one_task = session.get(Task, created["id"]).stored_bytes
    quota = {"tenant_max_active_tasks": 2} if limit == "tasks" else {"tenant_max_stored_bytes": 2 * one_task + 10}
    for api in make_api(tmp_path / "raced", tiny_checkpoint, **quota):
        answers = creates_released_together(api, monkeypatch, 6)
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [202, 202] + [429 if limit == "tasks" else 507] * 4, [a.text for a in answers]
        assert len(api.task_ids()) == 2
        folders = list((api.app.state.storage.root / "tasks").iterdir())
        assert len(folders) == 2  # the refused ones left nothing


def test_the_quota_counts_the_instant_stages_bytes(api, monkeypatch):
    from service.models import Task
    from service.quotas import folder_bytes

    task_id = _created_without_instant_build(api, monkeypatch)
    storage = api.app.state.storage
    folder = api.app.state.instant.ensure(task_id)
    with api.app.state.database.scope() as session:
        kept = session.get(Task, task_id).stored_bytes
    assert folder_bytes(folder) > 0
    assert kept == folder_bytes(storage.data_dir(task_id)) + folder_bytes(folder)



def test_a_zips_classnames_txt_names_its_classes_as_the_cli_reads_it(api, monkeypatch):
    import zipfile

    monkeypatch.setattr(api.app.state.instant, "schedule", lambda task_id: None)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("n01/a.png", PNG)
        archive.writestr("n02/b.png", PNG)
        archive.writestr("classnames.txt", "n01 handbag\nn02 ankle boot\n")
    created = api.post("/tasks", data={"method": "coop", "shots": "1", "epochs": "1"},
                       files=[("archive", ("data.zip", buffer.getvalue(), "application/zip"))])
    assert created.status_code == 202, created.text
    assert created.json()["class_names"] == ["handbag", "ankle boot"]
    # A folder it does not name is refused, as the CLI refuses it.
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("n03/c.png", PNG)
    assert_problem(api.post("/tasks", data={"method": "coop", "shots": "1", "epochs": "1"},
                            files=[("archive", ("data.zip", buffer.getvalue(), "application/zip"))]), 422, "n03")


# --- slow clients, over a real socket ------------------------------------------------------------------

def test_headers_sent_one_byte_a_second_are_cut_off_at_the_header_timeout(tmp_path, tiny_checkpoint):
    import socket
    import time

    import httpx

    from svc_helpers import api_process, base_env

    env = base_env(tmp_path / "data", tiny_checkpoint, UPT_HEADER_TIMEOUT_S="2", UPT_PRELOAD_BACKBONE="false")
    with api_process(env, tmp_path / "serve.log") as url:
        host, port = url.removeprefix("http://").split(":")
        request = b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
        slow = socket.create_connection((host, int(port)))
        slow.settimeout(1.0)
        started, answer = time.monotonic(), b""
        try:
            for byte in request:  # one header byte every second, as slowloris sends them
                if time.monotonic() - started > 8:
                    break
                slow.send(bytes([byte]))
                try:
                    chunk = slow.recv(4096)
                except socket.timeout:
                    continue
                answer += chunk
                if not chunk or b"\r\n\r\n" in answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            slow.close()
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and took < 6, (answer, took)
        # A client that sends its headers at once is served as before.
        assert httpx.get(url + "/livez", timeout=10).status_code == 200


# --- scratch owned by its process ----------------------------------------------------------------------

def test_scratch_is_swept_only_when_its_process_has_died(sqlite_database):
    import os
    import subprocess
    import sys
    import time

    from service.recovery import sweep_storage
    from service.scratch import scratch_dir
    from service.storage import Storage

    settings = sqlite_database.model_copy(update={"orphan_grace_s": 1.0})
    root = Storage.from_settings(settings).root / "tmp"
    long_ago = time.time() - 3600

    mine = scratch_dir(root)  # a /classify of this process that has waited long on a busy encoder
    os.utime(mine, (long_ago, long_ago))
    # Another process (a worker, another API on this host) that lives, holding its scratch.
    code = ("import sys, time; from pathlib import Path; from service.scratch import scratch_dir; "
            "print(scratch_dir(Path(sys.argv[1])), flush=True); time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(other.stdout.readline().strip())
        os.utime(theirs, (long_ago, long_ago))
        sweep_storage(settings, Database.from_settings(settings))
        assert mine.is_dir() and theirs.is_dir()  # both owners live: neither is swept, however old
    finally:
        other.kill()
        other.wait(10)
    young = time.time()
    os.utime(theirs, (young, young))
    sweep_storage(settings, Database.from_settings(settings))
    assert not theirs.exists()  # its owner died: gone at once, young or not
    assert mine.is_dir() and not list(root.parent.glob(f"tmp-owners/{theirs.name.split('-')[1]}.lock"))
    assert list(root.parent.glob("tmp-owners/*.lock"))  # this process's own lock stays


# --- leaks and loose ends (finding 14) -----------------------------------------------------------------

def test_the_artifact_zip_holds_no_server_path(api, tiny_checkpoint):
    import json
    import zipfile

    task_id = add_task(api, status="succeeded")
    folder = api.app.state.storage.artifact_dir(task_id)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "method": "coop", "backbone": {"model": "upt-tiny", "pretrained": str(tiny_checkpoint),
                                       "weights_sha256": "0123456789abcdef" * 4}}))
    (folder / "prompts.safetensors").write_bytes(b"\0")
    answer = api.client.get(f"/tasks/{task_id}/artifact", headers=api.headers)
    assert answer.status_code == 200, answer.text
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        config = archive.read(f"{task_id}/adapter_config.json").decode()
    assert str(tiny_checkpoint.parent) not in config and "/" not in json.loads(config)["backbone"]["pretrained"]
    assert json.loads(config)["backbone"]["pretrained"] == f"{tiny_checkpoint.name} (sha256 0123456789ab)"


def test_metrics_need_a_key_unless_public(tmp_path, tiny_checkpoint):
    for api in make_api(tmp_path, tiny_checkpoint, host="0.0.0.0"):
        assert_problem(api.client.get("/metrics"), 401, "UPT_METRICS_PUBLIC")
        answer = api.client.get("/metrics", headers=api.headers)
        assert answer.status_code == 200 and "upt_tasks" in answer.text


def test_a_key_held_by_a_killed_request_says_when_to_retry(api):
    from datetime import timedelta

    from service.auth import get_or_create_tenant
    from service.db import db_now
    from service.models import IdempotencyLock

    with api.app.state.database.scope() as session:  # what an API process killed mid-upload leaves
        session.add(IdempotencyLock(tenant_id=get_or_create_tenant(session, "acme").id, key="killed-1",
                                    created_at=db_now(session) - timedelta(seconds=600)))
    answer = api.post("/tasks", data=task_data(), files=image_files(PNG, PNG), headers={"Idempotency-Key": "killed-1"})
    assert_problem(answer, 409, "UPT_IDEMPOTENCY_LOCK_STALE_S")
    stale_after = api.settings.idempotency_lock_stale_s
    assert 60 <= int(answer.headers["retry-after"]) <= stale_after - 600, answer.headers


# --- an epoch's event after its checkpoint (finding 15) ----------------------------------------------

@pytest.mark.parametrize("method", ["coop", "clip-lora"])
def test_an_epochs_report_comes_after_its_checkpoint(tmp_path, tiny_checkpoint, fashion_train, method):
    import torch

    from upt.backbone import load_backbone
    from upt.training import CHECKPOINT_FILE, TrainCallbacks, TrainConfig, train

    seen: list[tuple[int, int]] = []

    class Watch(TrainCallbacks):
        def on_epoch_end(self, report) -> None:  # what the worker turns into the epoch's event
            state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=False)
            seen.append((report.epoch, state["epochs_done"]))

    config = TrainConfig.of(method, shots=1, seed=1, **({"iterations": 4} if method == "clip-lora" else {"epochs": 2}))
    train(load_backbone("upt-tiny", str(tiny_checkpoint), "cpu"), fashion_train, config, tmp_path / "out",
          callbacks=Watch(), checkpoint_dir=tmp_path / "ckpt")
    assert seen and all(epoch == done for epoch, done in seen), seen


# --- fairness between tenants on the serving path (finding 2) ----------------------------------------

def test_one_tenants_flood_queues_behind_its_own_and_heads_run_off_the_batchers_thread(tiny_checkpoint):
    import torch

    from service.batching import MicroBatcher
    from upt.backbone import load_backbone
    from upt.predict import Predictor
    from svc_helpers import wait_until

    backbone = load_backbone("upt-tiny", str(tiny_checkpoint), "cpu")
    passes: list[int] = []
    holding, release = threading.Event(), threading.Event()

    def encoder(images, prompts, normalize=True, depths=None):
        passes.append(len(images))
        if len(passes) == 1:  # the first pass runs until the others have queued
            holding.set()
            assert release.wait(30)
        return torch.zeros(len(images), 32)

    heads: list[str] = []

    class Watched(Predictor):
        def head(self, features):  # CoCoOp's is a text-encoder pass per image: never on the batcher's thread
            heads.append(threading.current_thread().name)
            return super().head(features)

    predictor = Watched(backbone, ["a", "b"], torch.randn(2, 32))
    batcher = MicroBatcher(window_s=0.05, max_batch=4, encoder=lambda b: encoder)
    image = torch.zeros(1, 3, backbone.image.size, backbone.image.size)
    order: list[str] = []

    def classify(tenant: str, images: int) -> None:
        batcher.logits(predictor, image.expand(images, -1, -1, -1), tenant=tenant)
        order.append(tenant)

    threads = [threading.Thread(target=classify, args=("heavy", 4))]
    threads[0].start()
    assert holding.wait(30)
    for _ in range(3):  # the heavy tenant's flood queues first ...
        threads.append(threading.Thread(target=classify, args=("heavy", 4)))
        threads[-1].start()
    wait_until(lambda: batcher._queue.qsize() == 3, "the flood to queue")
    threads.append(threading.Thread(target=classify, args=("light", 1)))  # ... then another tenant's one image
    threads[-1].start()
    wait_until(lambda: batcher._queue.qsize() == 4, "the light request to queue")
    release.set()
    for thread in threads:
        thread.join(30)
    # The light request went in the pass right after the one running (5 images: it, and one heavy request
    # to fill the pass), not behind the three heavy ones ([4, 4, 4, 5]).
    assert passes[1] == 5 and sorted(order) == ["heavy"] * 4 + ["light"], (passes, order)
    assert heads and "classify-batcher" not in heads, heads


# --- the same on PostgreSQL, where integers are int4 and transactions run concurrently ----------------

@pytest.fixture
def pg_api(tmp_path, tiny_checkpoint) -> Iterator[Api]:
    from svc_helpers import scratch_database

    with scratch_database("upt_redteam") as url:
        yield from make_api(tmp_path, tiny_checkpoint, database_url=url, tenant_max_active_tasks=2)


@pytest.mark.service
def test_numbers_past_int4_are_a_4xx_on_postgresql(pg_api):
    task_id = add_task(pg_api)
    # An unauthenticated 500 with a traceback per request, before.
    assert_problem(pg_api.client.get(f"/tasks/{task_id}/events", params={"token": "2147483648.1.n.x"}), 401)
    answer = pg_api.client.get(f"/tasks/{task_id}/events", headers={**pg_api.headers, "Accept": "text/event-stream",
                                                                   "Last-Event-ID": "2147483648.1"})
    assert_problem(answer, 422, "Last-Event-ID")


@pytest.mark.service
def test_quotas_hold_against_creates_released_together_on_postgresql(pg_api, monkeypatch):
    answers = creates_released_together(pg_api, monkeypatch, 6)
    assert sorted(a.status_code for a in answers) == [202, 202, 429, 429, 429, 429], [a.text for a in answers]
