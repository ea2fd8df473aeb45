"""Bad input is refused before anything trains: cut bodies, context phrases that do not fit the text
encoder, class names that differ only in their Unicode spelling, zip entries hidden from the count."""

from __future__ import annotations

import io
import time
import zipfile

import httpx
import pytest

from PIL import Image

from svc_helpers import CLASSES, images, task_form, wait_for

PNG = images("train", 1)[0][1].read_bytes()


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def task_ids(client: httpx.Client) -> set[str]:
    return {t["id"] for t in client.get("/tasks", params={"limit": 100}).json()["items"]}


@pytest.mark.service
def test_a_body_cut_before_its_closing_boundary_is_a_400_not_a_task_without_its_last_field(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=1, shots=1)
    request = client.build_request("POST", "/tasks", data=data, files=files + [("epochs", (None, b"1"))])
    body = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    cut = body[:-len(boundary) - 8]  # the epochs part ends without its closing boundary
    before = task_ids(client)
    response = client.post("/tasks", content=cut, headers={"Content-Type": request.headers["content-type"]})
    assert "incomplete" in assert_problem(response, 400)["detail"]
    assert task_ids(client) == before


@pytest.mark.service
def test_ctx_init_is_checked_against_the_tokenizer_and_the_context_length(stack):
    client = stack.client("acme")
    before = task_ids(client)
    for phrase in ("word " * 200, "x" * 60_000, "\x00\x01", "\u200b"):
        data, files = task_form(per_class=1, shots=1, epochs=1, ctx_init=phrase)
        body = assert_problem(client.post("/tasks", data=data, files=files), 422, "ctx_init")
        assert "ctx_init" in body["detail"]
    assert task_ids(client) == before
    data, files = task_form(per_class=1, shots=1, epochs=1, ctx_init="a photo of a")
    accepted = client.post("/tasks", data=data, files=files)
    assert accepted.status_code == 202, accepted.text
    assert client.delete(f"/tasks/{accepted.json()['id']}").status_code == 204


@pytest.mark.service
def test_class_names_are_compared_after_nfc_normalisation_in_fields_and_zip_folders(stack):
    client = stack.client("acme")
    composed, decomposed = "c\u00e1t", "ca\u0301t"
    data = {"class_names": [composed, decomposed], "labels": [composed, decomposed], "method": "coop",
            "shots": "1", "epochs": "1"}
    files = [("files", (f"{i}.png", PNG, "image/png")) for i in range(2)]
    assert_problem(client.post("/tasks", data=data, files=files), 422, "class_names")

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{composed}/a.png", PNG)
        zipped.writestr(f"{decomposed}/b.png", PNG)
    assert_problem(client.post("/tasks", data={"method": "coop"},
                               files=[("archive", ("c.zip", archive.getvalue(), "application/zip"))]),
                   422, "class_names")

    # The same name typed in either form is one class: labels in NFD match class names in NFC.
    data = {"class_names": [composed, "dog"], "labels": [decomposed, "dog"], "method": "coop", "shots": "1",
            "epochs": "1"}
    accepted = client.post("/tasks", data=data, files=files)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["class_names"] == [composed, "dog"]
    assert client.delete(f"/tasks/{accepted.json()['id']}").status_code == 204


@pytest.mark.service
def test_every_zip_entry_counts_against_upt_max_files_hidden_ones_too(stack):
    client = stack.client("acme")
    limit = int(stack.env["UPT_MAX_FILES"])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in CLASSES[:2]:
            zipped.writestr(f"{name}/a.png", PNG)
        for index in range(limit):
            zipped.writestr(f".h/{index}", b"")
    body = assert_problem(client.post("/tasks", data={"method": "coop", "epochs": "1"},
                                      files=[("archive", ("a.zip", archive.getvalue(), "application/zip"))]), 413)
    assert "UPT_MAX_FILES" in body["detail"]


@pytest.mark.service
def test_too_many_classify_images_names_upt_max_classify_files(stack):
    client = stack.client("acme")
    files = [("files", (f"{i}.png", PNG, "image/png")) for i in range(65)]  # UPT_MAX_CLASSIFY_FILES is 64
    body = assert_problem(client.post("/classify", data={"class_names": CLASSES}, files=files), 413)
    assert "UPT_MAX_CLASSIFY_FILES" in body["detail"] and "UPT_MAX_FILES" not in body["detail"].replace(
        "UPT_MAX_CLASSIFY_FILES", "")


def solid_png(width: int, height: int) -> bytes:
    """Many pixels in few bytes (one colour compresses to almost nothing)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.service
def test_decoded_pixels_per_request_are_bounded_before_decoding(stack):
    client = stack.client("acme")
    big = solid_png(2000, 2000)  # 4 MP each: within UPT_MAX_IMAGE_PIXELS; four are over the request's 10 MP
    assert len(big) < 50_000
    files = [("files", (f"{i}.png", big, "image/png")) for i in range(4)]
    body = assert_problem(client.post("/classify", data={"class_names": CLASSES}, files=files), 413)
    assert "UPT_MAX_REQUEST_PIXELS" in body["detail"]
    before = task_ids(client)
    data = {"class_names": CLASSES[:2], "labels": [CLASSES[i % 2] for i in range(4)], "method": "coop",
            "shots": "1", "epochs": "1"}
    body = assert_problem(client.post("/tasks", data=data, files=files), 413)
    assert "UPT_MAX_REQUEST_PIXELS" in body["detail"]
    assert task_ids(client) == before
    # Within the bound, the same images are classified.
    assert client.post("/classify", data={"class_names": CLASSES}, files=files[:2]).status_code == 200


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    from service.uploads import DRAFT_SIDE, ImageLimits, check_request_pixels, decode_upload

    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(buffer, format="JPEG")
    image = decode_upload(buffer.getvalue(), "big.jpg", "files", ImageLimits(40_000_000, 80_000_000, 20.0))
    assert image.size == (1000, 750) and min(image.size) >= DRAFT_SIDE  # the decoder's 1/4 scale
    # The request bound counts the pixels really decoded: 100 such JPEGs are 75 MP, not 1.2 GP.
    path = tmp_path / "big.jpg"
    path.write_bytes(buffer.getvalue())
    check_request_pixels([(path, "big.jpg", "files")] * 100, ImageLimits(40_000_000, 80_000_000, 20.0))


@pytest.mark.service
@pytest.mark.slow
def test_class_names_with_a_slash_or_a_leading_dot_train_and_classify(stack):
    client = stack.client("acme")
    names = ["T-shirt/top", ".hidden"]
    chosen = images("train", 2)[:4]
    data = {"class_names": names, "labels": [names[i % 2] for i in range(4)], "method": "coop", "shots": "1",
            "epochs": "1", "batch_size": "2"}
    files = [("files", (p.name, p.read_bytes(), "image/png")) for _, p in chosen]
    created = client.post("/tasks", data=data, files=files)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    stored = stack.tmp / "data" / "storage" / "tasks" / task_id / "data"
    assert sorted(p.name for p in stored.iterdir()) == ["00000", "00001"]  # by index, never by name
    worker = stack.start_worker("worker-names")
    try:
        done = wait_for(client, task_id, {"succeeded", "failed"})
        assert done["status"] == "succeeded", (done, worker.tail())
    finally:
        worker.stop()
    predicted = client.post("/classify", data={"task_id": task_id}, files=files[:1])
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["class_names"] == names
    assert client.delete(f"/tasks/{task_id}").status_code == 204


@pytest.mark.service
def test_an_idempotency_key_reused_for_another_request_is_a_422_and_a_retry_replays(stack):
    client = stack.client("globex")
    headers = {"Idempotency-Key": "fingerprinted-1"}
    data, files = task_form(per_class=1, shots=1, epochs=1)
    first = client.post("/tasks", data=data, files=files, headers=headers)
    assert first.status_code == 202, first.text
    retry = client.post("/tasks", data=data, files=files, headers=headers)
    assert retry.status_code == 202 and retry.json()["id"] == first.json()["id"]
    assert retry.headers["idempotent-replayed"] == "true"
    other_files = list(reversed(files))  # the same names, other contents per position
    for changed_data, changed_files in (({**data, "epochs": "2"}, files), ({**data, "method": "vpt-shallow"}, files),
                                        (data, other_files)):
        body = assert_problem(client.post("/tasks", data=changed_data, files=changed_files, headers=headers), 422,
                              "Idempotency-Key")
        assert body["type"].endswith("/idempotency-key-reused")
    assert client.delete(f"/tasks/{first.json()['id']}").status_code == 204


@pytest.mark.service
def test_a_retry_while_the_first_request_is_still_uploading_is_a_409(stack):
    import threading

    client = stack.client("globex")
    headers = {"Idempotency-Key": "in-flight-1"}
    data, files = task_form(per_class=1, shots=1, epochs=1)
    request = client.build_request("POST", "/tasks", data=data, files=files, headers=headers)
    body = request.read()
    release = threading.Event()

    def slow_body():
        yield body[:100]
        release.wait(30)  # the first request stays in flight, its body half sent
        yield body[100:]

    first: dict = {}
    sender = threading.Thread(target=lambda: first.update(response=client.post(
        "/tasks", content=slow_body(), headers={**headers, "Content-Type": request.headers["content-type"]})))
    sender.start()
    time.sleep(0.5)  # its headers and first bytes are in
    try:
        deadline = time.monotonic() + 10
        while True:
            retry = client.post("/tasks", data=data, files=files, headers=headers)
            if retry.status_code == 409 or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # until the first request has taken the key
        problem = assert_problem(retry, 409)
        assert problem["type"].endswith("/idempotency-key-in-use") and retry.headers["retry-after"]
    finally:
        release.set()
        sender.join(30)
    assert first["response"].status_code == 202, first["response"].text
    again = client.post("/tasks", data=data, files=files, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first["response"].json()["id"]
    assert client.delete(f"/tasks/{again.json()['id']}").status_code == 204
