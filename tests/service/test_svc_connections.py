"""The API's database connections under load: a request holds none while it waits on anything but the
database (an upload's body, an encoder pass), and one that finds none free gets a 503, not a 500.

Under 16 clients an encoder pass took 30-50 s on a loaded 2-core machine; every /classify of a task
held its pooled connection through it, the pool (15) ran dry and a request failed with a 500.
These tests shrink the pool to two connections so that the same thing happens in seconds.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from svc_helpers import CLASSES, api_in_process, images, task_form, wait_until

pytestmark = pytest.mark.service
POOL = 2


@pytest.fixture
def small_pool_api(tmp_path, tiny_checkpoint):
    """An API in this process (its pool can be watched) on PostgreSQL with a pool of two connections,
    API keys required; yields (base URL, app, headers)."""
    with api_in_process(tmp_path, tiny_checkpoint, instant_augment_views=1, database_max_connections=POOL,
                        database_pool_timeout_s=1.0) as api:
        yield api


def _gated_encoder(app):
    """Makes every encoder pass wait for `gate`; `entered` is set once a pass is waiting."""
    gate, entered = threading.Event(), threading.Event()
    original = app.state.batcher.encoder

    def encoder(backbone):
        real = original(backbone)

        def run(images, prompts, depths=None):
            entered.set()
            gate.wait(60)
            return real(images, prompts, depths=depths)
        return run

    app.state.batcher.encoder = encoder
    return gate, entered


def test_a_slow_upload_holds_no_database_connection(small_pool_api):
    base, app, headers = small_pool_api
    data, files = task_form(per_class=2, method="coop", epochs=1)
    request = httpx.Client().build_request("POST", base + "/tasks", data=data, files=files)
    body, resume = request.read(), threading.Event()

    def slowly():  # the first bytes, then a pause as a slow client's
        yield body[:600]
        resume.wait(30)
        yield body[600:]

    scratch = app.state.storage.root / "tmp"
    pool = app.state.database.engine.pool
    with ThreadPoolExecutor(1) as pool_of_one:
        answer = pool_of_one.submit(httpx.post, base + "/tasks", content=slowly(), timeout=60,
                                    headers={**headers, "content-type": request.headers["content-type"]})
        wait_until(lambda: scratch.exists() and any(scratch.iterdir()), "the route to start reading the body",
                   timeout=30)
        time.sleep(0.3)
        assert pool.checkedout() == 0, "a request waiting on its body holds a database connection"
        resume.set()
        assert answer.result().status_code == 202, answer.result().text


def test_classify_holds_no_connection_through_the_encoder_pass(small_pool_api):
    """Twice as many task requests as connections wait on one encoder pass for longer than the pool's
    timeout; all answer 200 (before: the third and fourth failed with a 500 after the pool timeout)."""
    base, app, headers = small_pool_api
    data, files = task_form(per_class=2, method="coop", epochs=1)
    created = httpx.post(base + "/tasks", data=data, files=files, headers=headers, timeout=60)
    assert created.status_code == 202, created.text
    task_id = created.json()["id"]
    image = images("test", 1)[0][1]
    form = {"task_id": task_id, "stage": "instant"}

    def classify():
        return httpx.post(base + "/classify", data=form, headers=headers, timeout=60,
                          files=[("files", (image.name, image.read_bytes(), "image/png"))])

    first = classify()  # builds the instant stage, and caches its predictor
    assert first.status_code == 200, first.text
    gate, entered = _gated_encoder(app)
    with ThreadPoolExecutor(2 * POOL) as clients:
        answers = [clients.submit(classify) for _ in range(2 * POOL)]
        wait_until(entered.is_set, "an encoder pass", timeout=30)
        time.sleep(2.5)  # past the pool timeout (1 s) with every request in flight
        assert app.state.database.engine.pool.checkedout() == 0
        gate.set()
        results = [a.result() for a in answers]
    assert [r.status_code for r in results] == [200] * (2 * POOL), [r.text for r in results]
    assert all(r.json()["predictions"][0]["labels"][0]["label"] in CLASSES for r in results)


def test_no_free_connection_is_a_503_with_retry_after(small_pool_api):
    base, app, headers = small_pool_api
    held = [app.state.database.engine.connect() for _ in range(POOL)]
    try:
        answer = httpx.get(base + "/tasks", headers=headers, timeout=30)
    finally:
        for connection in held:
            connection.close()
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"] == "/problems/database-busy" and int(answer.headers["retry-after"]) > 0
    assert httpx.get(base + "/tasks", headers=headers, timeout=30).status_code == 200  # and it recovers
