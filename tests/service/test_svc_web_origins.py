"""Web clients on other origins, through a real `upt serve`: CORS preflights and responses."""

from __future__ import annotations

import httpx
import pytest

from svc_helpers import ALLOWED_ORIGIN, Stack

pytestmark = pytest.mark.service
OTHER_ORIGIN = "https://evil.example.net"


def preflight(url: str, origin: str, method: str = "POST", headers: str = "authorization,idempotency-key"):
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": headers}, timeout=30)


def test_preflight_from_an_allowed_origin_and_from_another(stack):
    allowed = preflight(f"{stack.url}/tasks", ALLOWED_ORIGIN)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    requested = {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "x-api-key", "idempotency-key"} <= requested
    assert "cookie" not in requested and "access-control-allow-credentials" not in allowed.headers

    other = preflight(f"{stack.url}/tasks", OTHER_ORIGIN)
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_cross_origin_responses_expose_location_etag_retry_after(stack):
    client = stack.client("acme")
    listing = client.get("/tasks", headers={"Origin": ALLOWED_ORIGIN})
    assert listing.status_code == 200
    assert listing.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = {h.strip().lower() for h in listing.headers["access-control-expose-headers"].split(",")}
    assert {"location", "retry-after", "etag"} <= exposed
    # Errors carry the headers too, or a page on another origin could not read why it was refused.
    refused = httpx.get(f"{stack.url}/tasks", headers={"Origin": ALLOWED_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # Another origin gets the answer (CORS is the browser's check) but no permission to read it.
    assert "access-control-allow-origin" not in client.get("/tasks", headers={"Origin": OTHER_ORIGIN}).headers


def test_preflight_answers_without_the_database(stack, tmp_path):
    """An API whose database is unreachable still answers preflights: they never reach a route."""
    env = dict(stack.env, UPT_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:9/unreachable",
               UPT_PRELOAD_BACKBONE="false")
    api = Stack(env, tmp_path)
    api.start_api()
    try:
        answer = preflight(f"{api.url}/tasks/0123abcd/events", ALLOWED_ORIGIN, method="GET",
                           headers="authorization,last-event-id")
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        # The routes themselves do need it: this API really has no database.
        assert httpx.get(f"{api.url}/tasks", headers={"Authorization": f"Bearer {stack.keys['acme']}"},
                         timeout=30).status_code >= 500
    finally:
        api.api.stop()


def test_no_allow_list_means_same_origin_only(sqlite_database):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(sqlite_database.model_copy(update={"preload_backbone": False}))) as client:
        answer = client.options("/tasks", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
