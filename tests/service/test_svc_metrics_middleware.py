"""The request counter of /metrics: one count per request, labelled by route template and status, also
for problems and for errors that escape every handler (the middleware is pure ASGI)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.prometheus import Metrics, MetricsMiddleware


def sample_sum(metric, suffix: str, **labels: str) -> float:
    """The value of `metric`'s samples named *`suffix` with exactly these labels (0 if none)."""
    return sum(sample.value for family in metric.collect() for sample in family.samples
               if sample.name.endswith(suffix) and sample.labels == labels)


def counted(metrics: Metrics, method: str, route: str, status: str) -> float:
    return sample_sum(metrics.requests, "_total", method=method, route=route, status=status)


def latencies(metrics: Metrics, method: str, route: str) -> float:
    return sample_sum(metrics.latency, "_count", method=method, route=route)


def app_with(metrics: Metrics) -> Starlette:
    async def item(request):
        return JSONResponse({"detail": "no"}, status_code=422)

    async def boom(request):
        raise RuntimeError("a bug")

    async def stream(request):
        return StreamingResponse(iter([b"a", b"b"]), media_type="text/plain")

    routes = [Route("/items/{item_id}", item), Route("/boom", boom), Route("/stream", stream)]
    return Starlette(routes=routes, middleware=[Middleware(MetricsMiddleware, metrics=metrics)])


def test_requests_are_counted_by_route_template_and_status():
    metrics = Metrics(database=None)  # the task collector reads the database only when scraped
    client = TestClient(app_with(metrics), raise_server_exceptions=False)
    assert client.get("/items/1").status_code == 422
    assert client.get("/items/2").status_code == 422
    assert client.get("/boom").status_code == 500
    assert client.get("/stream").text == "ab"
    assert client.get("/nowhere").status_code == 404
    assert counted(metrics, "GET", "/items/{item_id}", "422") == 2
    assert counted(metrics, "GET", "/boom", "500") == 1  # escaped every handler: still counted, once
    assert counted(metrics, "GET", "/stream", "200") == 1
    assert counted(metrics, "GET", "static", "404") == 1
    assert latencies(metrics, "GET", "/items/{item_id}") == 2 and latencies(metrics, "GET", "/boom") == 1
