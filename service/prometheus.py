"""Prometheus metrics: HTTP requests, tasks by status, training durations, classify batch sizes.

Task counts and training durations are read from the database at scrape time: the database is the
source of truth and the workers run elsewhere, so every API replica reports the same fleet-wide
numbers without a push gateway.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select
from starlette.responses import Response

from service.db import Database
from service.models import Task, TaskStatus

TRAINING_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class TaskCollector:
    def __init__(self, database: Database) -> None:
        self.database = database

    def collect(self):
        with self.database.session() as session:
            counts = dict(session.execute(select(Task.status, func.count()).group_by(Task.status)).all())
            yield self._by_status(counts)
            yield self._durations(session)

    @staticmethod
    def _by_status(counts: dict) -> GaugeMetricFamily:
        family = GaugeMetricFamily("upt_tasks", "Tasks in the database by status", labels=["status"])
        for status in TaskStatus:
            family.add_metric([status.value], counts.get(status.value, 0))
        return family

    @staticmethod
    def _durations(session) -> HistogramMetricFamily:
        # Aggregated by the database: one row per scrape however many trainings have succeeded.
        if session.get_bind().dialect.name == "sqlite":
            seconds = (func.julianday(Task.finished_at) - func.julianday(Task.started_at)) * 86400.0
        else:
            seconds = func.extract("epoch", Task.finished_at - Task.started_at)
        columns = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.coalesce(func.sum(case((seconds <= bound, 1), else_=0)), 0) for bound in TRAINING_BUCKETS]
        row = session.execute(select(*columns).where(
            Task.status == TaskStatus.succeeded.value, Task.started_at.is_not(None), Task.finished_at.is_not(None),
        )).one()
        count, total, per_bucket = int(row[0]), float(row[1]), [int(v) for v in row[2:]]
        buckets = [(str(b), n) for b, n in zip(TRAINING_BUCKETS, per_bucket)] + [("+Inf", count)]
        family = HistogramMetricFamily("upt_training_duration_seconds",
                                       "Wall time of succeeded trainings, first claim to finish")
        family.add_metric([], buckets, sum_value=total)
        return family


class Metrics:
    def __init__(self, database: Database) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("upt_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("upt_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)
        self.classify_batch = Histogram("upt_classify_batch_size", "Images per /classify request",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.encoder_batch = Histogram("upt_classify_encoder_batch_size",
                                       "Images per image-encoder pass (concurrent requests of any tasks micro-batched); "
                                       "_count is the number of encoder passes, _sum the images they encoded",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.encoder_seconds = Histogram("upt_classify_encoder_seconds",
                                         "Wall time of each image-encoder pass with its logits; _sum over a period, "
                                         "divided by the period, is the share of it the encoder was busy",
                                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                         registry=self.registry)
        self.registry.register(TaskCollector(database))

    def observe_encoder_pass(self, images: int, seconds: float) -> None:
        self.encoder_batch.observe(images)
        self.encoder_seconds.observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts each request by route template and status, and its time to the response's first byte.

    Pure ASGI: Starlette's BaseHTTPMiddleware runs every request through an extra task and a memory
    stream, which cost far more CPU than the counting itself."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        counted = False

        def count(status: int) -> None:
            nonlocal counted
            counted = True
            # The route template, not the path, keeps task ids out of the label set (the router sets
            # scope["route"] on this same scope).
            route = getattr(scope.get("route"), "path", None) or "static"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start" and not counted:
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:  # an error escaped before any response began
                count(500)
