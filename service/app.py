"""The FastAPI application: routes, problem+json errors, metrics, and the web client at `/`.

`create_app(settings)` builds everything a request uses from the settings it is given and keeps it on
`app.state`, where the request dependencies (service.api.deps) read it; nothing reads the environment
again, so the settings an app was created with are the only ones its requests see.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from service.api.openapi import document_problems
from service.api import classify, events, export, health, methods, tasks
from service.batching import MicroBatcher
from service.db import Database
from service.errors import install_error_handlers
from service.instant import InstantStages
from service.prometheus import Metrics, MetricsMiddleware
from service.queue import TrainingQueue
from service.recovery import Sweeper
from service.serving_cache import ServingCache
from service.settings import Settings
from service.storage import Storage
from service.stream_slots import StreamSlots
from service.timeouts import RequestBoundsMiddleware
from service.uploads import configure_pillow

log = logging.getLogger("upt.service")
WEB_DIR = Path(__file__).parent / "web"
# What a page on another origin may send, and read back, beyond the CORS-safelisted headers.
CORS_REQUEST_HEADERS = ["Authorization", "X-API-Key", "Idempotency-Key", "If-None-Match", "Last-Event-ID"]
CORS_EXPOSED_HEADERS = ["Location", "Retry-After", "ETag", "Idempotent-Replayed"]


def create_app(settings: Settings) -> FastAPI:
    settings.check()
    configure_pillow(settings.max_image_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.preload_backbone:
            # Load in the background: /livez answers at once, /readyz turns ready when loaded.
            app.state.serving.start_loading()
        # The API sweeps too, so a dead worker's task is taken out of `running` even while no worker
        # is up; sweeps are compare-and-set, so any number of API replicas and workers can run them.
        sweeper = Sweeper(settings, app.state.database, app.state.queue,
                          chores=[app.state.instant.resume_unfinished,
                                  lambda: events.purge_used_tokens(app.state.database)])
        sweeper.start()
        yield
        sweeper.stop()
        app.state.instant.shutdown()
        app.state.database.dispose()

    app = FastAPI(title="upt", version="0.1.0", lifespan=lifespan,
                  description="Few-shot prompt tuning of a frozen CLIP, as a service.")
    app.state.settings = settings
    app.state.database = Database.from_settings(settings)
    app.state.serving = ServingCache(settings)
    app.state.storage = Storage.from_settings(settings)
    app.state.queue = TrainingQueue(settings)
    app.state.metrics = Metrics(app.state.database)
    app.state.streams = StreamSlots(settings.tenant_max_streams)
    app.state.instant = InstantStages(settings, app.state.storage, app.state.serving, app.state.database)
    app.state.batcher = MicroBatcher(settings.batch_window_ms / 1000, settings.max_batch,
                                     observe=app.state.metrics.observe_encoder_pass,
                                     encoder=app.state.serving.image_encoder)
    app.add_middleware(RequestBoundsMiddleware, total_s=settings.body_timeout_s, idle_s=settings.body_idle_timeout_s,
                       max_header_bytes=settings.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.cors_origins:
        # Added last, so it is the outermost layer: a preflight is answered here and never reaches a
        # route, a dependency or the database. Keys travel in headers, not cookies: no credentials.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=CORS_REQUEST_HEADERS,
                           expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    install_error_handlers(app)
    for module in (tasks, events, classify, health, methods, export):
        app.include_router(module.router)
    document_problems(app)
    # After the API routes, so that they win over files of the same name.
    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app
