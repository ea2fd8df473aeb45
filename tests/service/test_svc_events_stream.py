"""Live task events as server-sent events through a real `upt serve` and worker: order, resumption
after dropped connections, the end of the stream, and the EventSource tokens' keys and tenants."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from svc_helpers import task_form

pytestmark = pytest.mark.service
STREAM = {"Accept": "text/event-stream"}


def read_events(response: httpx.Response):
    """(event, id, data) as an EventSource would dispatch them."""
    kind, event_id, data = "message", None, []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield kind, event_id, "\n".join(data)
            kind, data = "message", []
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "id":
                event_id = value
            elif field == "data":
                data.append(value)


@pytest.mark.slow
def test_stream_delivers_every_epoch_in_order_and_resumes_after_dropped_connections(stack):
    client = stack.client("acme")
    data, files = task_form(per_class=2, method="coop", shots=2, epochs=6, batch_size=2)
    task = client.post("/tasks", data=data, files=files).json()
    url = f"/tasks/{task['id']}/events"
    worker = stack.start_worker("stream-worker")
    try:
        epochs, progress, end, last_id, connections = [], [], None, None, 0
        deadline = time.monotonic() + 300
        while end is None and time.monotonic() < deadline:
            connections += 1
            headers = dict(STREAM, **({"Last-Event-ID": last_id} if last_id else {}))
            with client.stream("GET", url, headers=headers, timeout=120) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                for received, (kind, event_id, body) in enumerate(read_events(response), start=1):
                    last_id = event_id
                    if kind == "epoch":
                        epochs.append(json.loads(body)["epoch"])
                    elif kind == "progress":
                        progress.append(json.loads(body))
                    elif kind == "end":
                        end = json.loads(body)
                        break
                    if received == 2:  # drop the connection, as a flaky network does
                        break
        assert end == {"status": "succeeded"}, worker.tail()
    finally:
        worker.stop()
    assert connections >= 3
    assert epochs == [1, 2, 3, 4, 5, 6]  # every epoch, in order, none twice
    assert progress[-1]["status"] == "succeeded" and progress[-1]["id"] == task["id"]
    values = [p["progress"] for p in progress]
    assert values == sorted(values)
    # The client has seen the end: a reconnection is told to stop (EventSource obeys 204).
    assert client.get(url, headers=dict(STREAM, **{"Last-Event-ID": last_id})).status_code == 204
    # From the start again, a finished task's stream replays its history and ends by itself.
    with client.stream("GET", url, headers=STREAM, timeout=60) as response:
        replay = list(read_events(response))
    assert [json.loads(b)["epoch"] for k, _, b in replay if k == "epoch"] == [1, 2, 3, 4, 5, 6]
    assert replay[-1][0] == "end"
    # Without Accept: text/event-stream the same URL is the JSON history, as before.
    assert [e["epoch"] for e in client.get(url).json()["items"]] == [1, 2, 3, 4, 5, 6]


def test_eventsource_tokens_follow_keys_and_tenants(stack):
    acme, globex = stack.client("acme"), stack.client("globex")
    data, files = task_form(per_class=2, method="coop", shots=1, epochs=1)
    mine = acme.post("/tasks", data=data, files=files).json()["id"]
    other = acme.post("/tasks", data=data, files=files).json()["id"]
    theirs = globex.post("/tasks", data=data, files=files).json()["id"]

    minted = acme.post(f"/tasks/{mine}/events/token")
    assert minted.status_code == 200, minted.text
    token = minted.json()
    assert stack.keys["acme"] not in token["url"] and token["url"] == f"/tasks/{mine}/events?token={token['token']}"
    with httpx.stream("GET", stack.url + token["url"], headers=STREAM, timeout=30) as response:  # no header at all
        assert response.status_code == 200
        kind, _, body = next(read_events(response))
        assert kind == "progress" and json.loads(body)["id"] == mine

    def status(path: str) -> int:
        return httpx.get(stack.url + path, headers=STREAM, timeout=30).status_code

    assert status(f"/tasks/{mine}/events") == 401  # neither key nor token
    assert status(f"/tasks/{other}/events?token={token['token']}") == 401  # made for another task
    forged = token["token"][:-2] + ("AA" if not token["token"].endswith("AA") else "BB")
    assert status(f"/tasks/{mine}/events?token={forged}") == 401
    key_id, expires, nonce, signature = token["token"].split(".")
    assert status(f"/tasks/{mine}/events?token={key_id}.{int(expires) + 3600}.{nonce}.{signature}") == 401  # extended
    assert globex.post(f"/tasks/{mine}/events/token").status_code == 404  # another tenant's task
    theirs_token = globex.post(f"/tasks/{theirs}/events/token").json()["token"]
    assert status(f"/tasks/{mine}/events?token={theirs_token}") == 401

    # Revoking the key voids the tokens made with it.
    spare = json.loads(stack.command("keys", "create", "--tenant", "acme", "--json"))["key"]
    spare_token = httpx.post(f"{stack.url}/tasks/{mine}/events/token", headers={"Authorization": f"Bearer {spare}"},
                             timeout=30).json()["token"]
    stack.command("keys", "revoke", spare)
    assert status(f"/tasks/{mine}/events?token={spare_token}") == 401


def test_an_expired_token_is_refused(sqlite_database, sqlite_sessions):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key, get_or_create_tenant
    from service.models import Task

    with sqlite_sessions.scope() as session:
        key = create_key(session, "acme")
        session.add(Task(id="c" * 32, tenant_id=get_or_create_tenant(session, "acme").id, method="coop", config={},
                         class_names=["a", "b"], num_images=2, model="m", pretrained="p", status="succeeded"))
    settings = sqlite_database.model_copy(update={"stream_token_ttl_s": 1.0, "preload_backbone": False})
    with TestClient(create_app(settings)) as client:
        url = client.post("/tasks/" + "c" * 32 + "/events/token", headers={"Authorization": f"Bearer {key}"}).json()["url"]
        assert client.get(url, headers=STREAM).status_code == 200  # finished: the whole history, then the end
        time.sleep(2.1)
        expired = client.get(url, headers=STREAM)
        assert expired.status_code == 401 and "expired" in expired.json()["detail"]


def test_an_open_stream_does_not_hold_up_shutdown(stack, tmp_path):
    """SIGTERM stops `upt serve` within its grace period even while a client follows a queued task."""
    import threading

    from service.commands import SHUTDOWN_GRACE_S
    from svc_helpers import Stack

    api = Stack(stack.env, tmp_path)
    api.keys = stack.keys
    api.start_api()
    client = api.client("acme")
    data, files = task_form(per_class=1, method="coop", shots=1, epochs=1)
    task = client.post("/tasks", data=data, files=files).json()
    opened = threading.Event()

    def follow() -> None:
        try:
            with client.stream("GET", f"/tasks/{task['id']}/events", headers=STREAM, timeout=120) as response:
                for _ in read_events(response):
                    opened.set()
        except httpx.HTTPError:
            pass

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert opened.wait(30)
    started = time.monotonic()
    code = api.api.stop(timeout=SHUTDOWN_GRACE_S + 20)
    # -9: it had to be killed. Otherwise uvicorn ends by re-raising the SIGTERM it caught (-15).
    assert code in (0, -15) and time.monotonic() - started < SHUTDOWN_GRACE_S + 10, api.api.tail()
    reader.join(10)
    assert not reader.is_alive()
