"""upt.client without a server (httpx's MockTransport): polling with the task's ETag, what `wait`
raises, and errors that are no problem document (a proxy's page) still raised as ApiError."""

from __future__ import annotations

import httpx
import pytest

from upt.client import ApiError, Client, TaskFailedError


def _task(status: str, progress: float = 0.0, error: str | None = None) -> dict:
    return {"id": "t1", "status": status, "progress": progress, "epoch": None, "epochs": None, "error": error}


def _polled(states: list[dict]) -> tuple[Client, list[httpx.Request]]:
    """A client whose API answers GET /tasks/t1 with `states` in turn: 304 where a state repeats the
    one before (the ETag matches), Retry-After 0 while the task is not finished."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        index = min(len(seen), len(states) - 1)
        seen.append(request)
        state = states[index]
        etag = f'"{state["status"]}-{state["progress"]}"'
        headers = {"ETag": etag} | ({} if state["status"] in ("succeeded", "failed") else {"Retry-After": "0"})
        if request.headers.get("If-None-Match") == etag:
            return httpx.Response(304, headers=headers)
        return httpx.Response(200, json=state, headers=headers)

    return Client("http://upt.test", "key", transport=httpx.MockTransport(answer)), seen


def test_wait_polls_with_the_etag_until_the_task_succeeds():
    running = _task("running", 0.5)
    client, seen = _polled([_task("queued"), running, running, running, _task("succeeded", 1.0)])
    assert client.wait("t1", progress=False)["status"] == "succeeded"
    assert len(seen) == 5 and [r.headers.get("If-None-Match") for r in seen[:2]] == [None, '"queued-0.0"']
    assert seen[3].headers["If-None-Match"] == '"running-0.5"'  # an unchanged task cost a bodiless 304
    assert all(r.headers["Authorization"] == "Bearer key" for r in seen)


def test_wait_raises_with_the_failed_task():
    client, _ = _polled([_task("running"), _task("failed", error="diverged")])
    with pytest.raises(TaskFailedError, match="t1 failed: diverged") as failed:
        client.wait("t1", progress=False)
    assert failed.value.task["error"] == "diverged"


def test_wait_gives_up_after_its_timeout():
    client, _ = _polled([_task("running")])
    with pytest.raises(TimeoutError, match="still running"):
        client.wait("t1", timeout=0.05, progress=False)


def test_an_error_without_a_problem_document_is_raised_with_its_status_and_text():
    proxy = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>Bad gateway</html>"))
    with pytest.raises(ApiError) as raised:
        Client("http://upt.test", transport=proxy).task("t1")
    assert raised.value.status == 502 and "Bad gateway" in raised.value.detail
    assert raised.value.problem["title"] == "Bad Gateway"


def test_images_are_sent_as_files_whatever_their_kind(tmp_path):
    from PIL import Image

    sent: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return httpx.Response(200, json={"predictions": []})

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(path)
    client = Client("http://upt.test", transport=httpx.MockTransport(answer))
    client.classify([path, Image.open(path), path.read_bytes()], class_names=["red", "blue"])
    body = sent[0]
    assert body.count(b'name="files"') == 3 and body.count(b'name="class_names"') == 2
    assert b'filename="a.png"' in body and b'filename="image-2.png"' in body and b'filename="image-3"' in body
    with pytest.raises(TypeError, match="a path, bytes or a PIL image"):
        client.classify([3.5], class_names=["red"])
