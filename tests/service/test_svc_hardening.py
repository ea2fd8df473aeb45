"""Regression tests from a review of the service: inputs that used to answer 500, memory that grew
with the upload, the list query's index, and a worker that lost its lease overwriting an artifact."""

from __future__ import annotations

import base64
import io
import json
import struct
import tracemalloc
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from PIL import Image
from sqlalchemy import inspect

from service.db import Database
from service.models import Task, Tenant, utcnow
from service.settings import Settings
from service.storage import Storage
from service.uploads import ParsedForm, UploadedFile
from svc_helpers import CLASSES, images, task_form

PNG = images("train", 1)[0][1].read_bytes()


def assert_problem(response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def dds_with_unknown_pixel_format() -> bytes:
    """A DDS file whose pixel-format flags Pillow does not know: it raised NotImplementedError."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = struct.pack("<I", 25)
    return bytes(data)


# --- over HTTP, against the PostgreSQL + Redis stack ----------------------------------------------

@pytest.mark.service
def test_class_name_too_long_in_bytes_is_a_422_and_stores_nothing(stack):
    # 100 characters, but 400 bytes in UTF-8: more than a folder name may hold (255 bytes).
    name = "\U0001F600" * 100
    client = stack.client("acme")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    data["class_names"] = data["class_names"] + [name]
    data["labels"] = data["labels"] + [name]
    files = files + [("files", ("x.png", PNG, "image/png"))]
    before = client.get("/tasks").json()["items"]
    stored = stack.tmp / "data" / "storage" / "tasks"
    # Folders of other tests' tasks (any tenant, any page of the list) are there already: compare folders.
    folders_before = set(stored.iterdir()) if stored.exists() else set()
    assert_problem(client.post("/tasks", data=data, files=files), 422, "class_names")
    assert client.get("/tasks").json()["items"] == before
    new_folders = (set(stored.iterdir()) if stored.exists() else set()) - folders_before
    assert not any((p / "data").exists() and any((p / "data").iterdir()) for p in new_folders)


@pytest.mark.service
def test_cursor_naming_no_task_id_is_a_422(stack):
    client = stack.client("acme")
    for task_id in ("x\u0000", "\u00e9t\u00e9", 7):
        cursor = base64.urlsafe_b64encode(json.dumps(["2020-01-01T00:00:00+00:00", task_id]).encode()).decode()
        assert_problem(client.get("/tasks", params={"cursor": cursor}), 422, "cursor")


@pytest.mark.service
def test_top_k_that_is_not_ascii_digits_is_a_422(stack):
    client = stack.client("acme")
    files = [("files", ("a.png", PNG, "image/png"))]
    for top_k in ("\u00b2", "9" * 5000, "\u0663"):
        assert_problem(client.post("/classify", data={"class_names": CLASSES, "top_k": top_k}, files=files),
                       422, "top_k")


@pytest.mark.service
def test_image_pillow_cannot_decode_for_any_reason_is_a_422(stack):
    client = stack.client("acme")
    dds = dds_with_unknown_pixel_format()
    assert_problem(client.post("/classify", data={"class_names": CLASSES},
                               files=[("files", ("odd.dds", dds, "image/x-dds"))]), 422, "files")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    files[0] = ("files", ("odd.dds", dds, "image/x-dds"))
    assert_problem(client.post("/tasks", data=data, files=files), 422, "files")


@pytest.mark.service
def test_prompt_depth_beyond_the_backbone_is_a_422_not_a_task_that_fails_later(stack):
    client = stack.client("acme")
    before = client.get("/tasks").json()["items"]
    for method in ("vpt-deep", "joint", "coop"):
        data, files = task_form(per_class=1, method=method, shots=1, epochs=1, depth=100)
        assert_problem(client.post("/tasks", data=data, files=files), 422, "depth")
    assert client.get("/tasks").json()["items"] == before


@pytest.mark.service
def test_an_empty_idempotency_key_is_no_key(stack):
    client = stack.client("globex")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    ids = []
    for _ in range(2):
        response = client.post("/tasks", data=data, files=files, headers={"Idempotency-Key": ""})
        assert response.status_code == 202, response.text
        assert "idempotent-replayed" not in response.headers
        ids.append(response.json()["id"])
    assert ids[0] != ids[1]
    for task_id in ids:
        assert client.delete(f"/tasks/{task_id}").status_code == 204


@pytest.mark.service
def test_a_multipart_boundary_the_parser_refuses_is_a_400(stack):
    boundary = "x" * 300
    response = httpx.post(f"{stack.url}/classify", content=f"--{boundary}--\r\n".encode(), headers={
        "Authorization": f"Bearer {stack.keys['acme']}", "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_problem(response, 400)


# --- in process ------------------------------------------------------------------------------------

def test_archive_members_are_extracted_to_disk_not_held_in_memory(tmp_path):
    from service.task_input import parse_task_form

    archive = tmp_path / "000000.upload"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for index in range(24):  # 24 MB unpacked, a few KB packed
            zipped.writestr(f"{CLASSES[index % 2]}/{index}.png", b"\0" * 1_000_000)
    form = ParsedForm(fields={"method": ["coop"]}, files=[UploadedFile("archive", "data.zip", archive)])
    settings = Settings(data_dir=tmp_path, max_file_bytes=2_000_000, max_upload_bytes=50_000_000)
    import upt.training  # noqa: F401  parsing imports it lazily: not part of what is measured
    tracemalloc.start()
    try:
        spec = parse_task_form(form, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(spec.images) == 24 and spec.class_names == CLASSES[:2]
    assert peak < 8_000_000, f"parsing the archive held {peak} bytes"


def test_classify_decodes_one_upload_at_a_time(tmp_path):
    from service.api import classify

    live = {"now": 0, "most": 0}
    opened = Image.open

    def counting_open(*args, **kwargs):
        # Counted when its pixels are decoded: the request's pixel bound opens every header first.
        image = opened(*args, **kwargs)
        load, decoded = image.load, []

        def counting_load():
            if not decoded:
                decoded.append(True)
                live["now"] += 1
                live["most"] = max(live["most"], live["now"])
            return load()

        image.load = counting_load
        return image

    class Predictor:
        class_names = ["a", "b"]

        def preprocess(self, images):
            live["now"] -= len(images)
            return torch.zeros(len(images), 3, 4, 4)

        def logits(self, batch):
            return torch.zeros(len(batch), 2)

        def rank(self, logits, top_k):
            return [[] for _ in range(len(logits))]

    class ServingCache:
        def backbone(self):
            return SimpleNamespace(image=SimpleNamespace(size=4))

        def zero_shot_predictor(self, names):
            return Predictor()

    class Batcher:
        def logits(self, predictor, batch, tenant=None):
            return predictor.logits(batch)

    class Metrics:
        class classify_batch:
            @staticmethod
            def observe(value):
                pass

    uploads = []
    for index in range(6):
        path = tmp_path / f"{index}.upload"
        path.write_bytes(PNG)
        uploads.append(UploadedFile("files", f"{index}.png", path))
    form = ParsedForm(fields={"class_names": ["a", "b"]}, files=uploads)
    import service.uploads as uploads_module

    original = uploads_module.Image.open
    uploads_module.Image.open = counting_open
    try:
        out = classify._classify(form, None, None, Settings(data_dir=tmp_path), ServingCache(), None, Metrics(), Batcher(), None)
    finally:
        uploads_module.Image.open = original
    assert len(out.predictions) == 6
    assert live["most"] == 1, f"{live['most']} decoded uploads were held at once"


def test_list_query_has_a_tenant_created_at_index(sqlite_sessions):
    engine = sqlite_sessions.engine
    indexes = [ix["column_names"] for ix in inspect(engine).get_indexes("tasks")]
    assert ["tenant_id", "created_at", "id"] in indexes, indexes


def test_a_worker_that_lost_its_lease_does_not_replace_the_artifact(sqlite_database, sqlite_sessions,
                                                                   start_worker_process, tmp_path):
    from worker.tasks import Lease, _succeed

    start_worker_process(sqlite_database)
    with sqlite_sessions.scope() as session:
        tenant = Tenant(name="t")
        session.add(tenant)
        session.flush()
        task = Task(tenant_id=tenant.id, status="running", method="coop", config={"method": "coop"},
                    class_names=["a", "b"], num_images=2, model="m", pretrained="p", attempts=2,
                    lease="current", heartbeat_at=utcnow())
        session.add(task)
        session.flush()
        task_id = task.id
    storage = Storage(tmp_path / "storage")
    final = storage.artifact_dir(task_id)
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text("from the worker holding the lease")
    partial = storage.task_dir(task_id) / "artifact.partial-stale"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("from a worker presumed dead")

    _succeed(task_id, Lease(task_id, "stale", 1.0), storage, partial, {})

    assert (final / "adapter_config.json").read_text() == "from the worker holding the lease"
    assert not partial.exists()
    with sqlite_sessions.scope() as session:
        row = session.get(Task, task_id)
        assert row.status == "running" and row.lease == "current"


def parse_body(tmp_path, body: bytes, boundary: str):
    import asyncio

    from starlette.requests import Request

    from service.uploads import parse_form

    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/tasks", "headers": [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
    parsing = parse_form(Request(scope, receive), tmp_path / "scratch", max_files=10,
                         max_file_bytes=1_000_000, max_total_bytes=500_000_000)
    # In a thread of its own: the browser tests may leave an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, parsing).result()


def test_text_fields_of_a_multipart_form_have_a_total_limit(tmp_path):
    """Text fields are held in memory: 160 fields of 60 KB (about 10 MB) are refused, not collected."""
    from service.errors import Problem

    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n".encode()
            + b"x" * 60_000 + b"\r\n")
    with pytest.raises(Problem) as raised:
        parse_body(tmp_path, part * 160 + f"--{boundary}--\r\n".encode(), boundary)
    assert raised.value.status == 413



@pytest.mark.service
def test_a_diverging_training_records_its_epochs_on_postgresql(stack, start_worker_process):
    """A NaN loss (lr far too large) was refused by PostgreSQL's json type: the task failed with an
    internal DataError instead of recording its epochs (SQLite accepted it)."""
    from upt.training import EpochReport
    from worker.tasks import Lease, _callbacks

    start_worker_process(Settings(database_url=stack.env["UPT_DATABASE_URL"]))
    database = Database(stack.env["UPT_DATABASE_URL"])
    try:
        with database.scope() as session:
            tenant = session.query(Tenant).filter_by(name="acme").one()
            task = Task(tenant_id=tenant.id, status="running", method="coop", config={"method": "coop"},
                        class_names=["a", "b"], num_images=2, model="m", pretrained="p", attempts=1,
                        lease="mine", heartbeat_at=utcnow())
            session.add(task)
            session.flush()
            task_id = task.id
        lease = Lease(task_id, "mine", 1.0)
        _callbacks(lease, 1).on_epoch_end(EpochReport(epoch=1, epochs=2, loss=float("nan"), accuracy=0.5, lr=1e30,
                                                      elapsed_s=1.0, eta_s=float("inf"), progress=0.5))
        assert lease.stop_reason is None
        client = stack.client("acme")
        events = client.get(f"/tasks/{task_id}/events").json()["items"]
        assert [(e["epoch"], e["data"]["loss"], e["data"]["eta_s"]) for e in events] == [(1, None, None)]
        assert client.delete(f"/tasks/{task_id}").status_code == 204
    finally:
        database.dispose()


@pytest.mark.service
def test_replaying_a_task_whose_loss_is_nan_is_not_a_500(stack):
    import psycopg

    client = stack.client("acme")
    data, files = task_form(per_class=1, shots=1, epochs=1)
    headers = {"Idempotency-Key": "diverged-1"}
    task = client.post("/tasks", data=data, files=files, headers=headers).json()
    url = stack.env["UPT_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:  # what a diverging training's progress writes
        conn.execute("UPDATE tasks SET loss = 'NaN' WHERE id = %s", (task["id"],))
    again = client.post("/tasks", data=data, files=files, headers=headers)
    assert again.status_code == 202, again.text
    assert again.json()["id"] == task["id"] and again.json()["loss"] is None
    assert again.headers["content-type"] == "application/json" and again.headers["location"] == f"/tasks/{task['id']}"
    assert client.delete(f"/tasks/{task['id']}").status_code == 204


def _collect(body_files: dict, tmp_path, max_file_bytes: int):
    """Run the streaming multipart collector of parse_form over a body built by httpx."""
    import python_multipart
    from python_multipart.multipart import parse_options_header

    from service.uploads import _FormCollector

    tmp_path.mkdir()
    request = httpx.Request("POST", "http://upt.test/tasks", data={"method": "coop"}, files=body_files)
    _, params = parse_options_header(request.headers["content-type"])
    collector = _FormCollector(tmp_path, max_files=10, max_file_bytes=max_file_bytes)
    parser = python_multipart.MultipartParser(params[b"boundary"], collector.callbacks())
    parser.write(request.read())
    parser.finalize()
    return collector.form


def test_an_archive_may_be_larger_than_one_file(tmp_path):
    from service.errors import Problem

    big = b"PK" + bytes(5000)
    form = _collect({"archive": ("data.zip", big, "application/zip")}, tmp_path / "a", max_file_bytes=1000)
    assert form.files[0].size == len(big)  # bounded by the request limit, its members by the file limit
    with pytest.raises(Problem) as refused:
        _collect({"files": ("a.png", big, "image/png")}, tmp_path / "b", max_file_bytes=1000)
    assert refused.value.status == 413
