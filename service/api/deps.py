"""Every request dependency of the routes, in one place.

Each one reads what `create_app(settings)` put on `app.state`: the settings the app was created with,
its database, training queue, serving cache, storage, metrics, micro-batcher and instant stages.
Nothing here reads the environment or a process-wide cache, so two apps in one process (tests) each
see their own.

The getters of app.state are `async def` because they never block: FastAPI runs each plain `def`
dependency on its thread pool, a hop that costs more than the getter (with the pure-ASGI metrics
middleware, about 1.3 ms less CPU per /classify: bench/serving_load.py --model upt-tiny). What
touches the database (the session, the tenant) stays `def`, off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.auth import LOCAL_TENANT, get_or_create_tenant, tenant_of_key
from service.batching import MicroBatcher
from service.db import Database, release_connection
from service.errors import Problem
from service.instant import InstantStages
from service.models import Tenant
from service.prometheus import Metrics
from service.queue import TrainingQueue
from service.serving_cache import ServingCache
from service.settings import Settings
from service.storage import Storage
from service.stream_slots import StreamSlots


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.database


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    session = database.session()
    try:
        yield session
    finally:
        session.close()


async def get_serving(request: Request) -> ServingCache:
    return request.app.state.serving


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def get_instant(request: Request) -> InstantStages:
    return request.app.state.instant


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_queue(request: Request) -> TrainingQueue:
    return request.app.state.queue


async def get_streams(request: Request) -> StreamSlots:
    return request.app.state.streams


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session)]
ServingDep = Annotated[ServingCache, Depends(get_serving)]
StorageDep = Annotated[Storage, Depends(get_storage)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
InstantDep = Annotated[InstantStages, Depends(get_instant)]
QueueDep = Annotated[TrainingQueue, Depends(get_queue)]
StreamsDep = Annotated[StreamSlots, Depends(get_streams)]


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def current_tenant(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    """The tenant of the request's API key; without a key, tenant `local` where keys are not required."""
    key = presented_key(request)
    if key is None:
        if settings.api_keys_required:
            raise Problem(401, "Unauthorized", "Send an API key as `Authorization: Bearer KEY` "
                          "(create one with `upt keys create --tenant NAME`).",
                          headers={"WWW-Authenticate": "Bearer"})
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
    else:
        tenant = tenant_of_key(session, key)
    # Before the route reads a body or waits on the encoder: a request streaming a slow upload must
    # not hold one of the pool's few connections while it does.
    release_connection(session)
    if tenant is None:
        raise Problem(401, "Unauthorized", "This API key is unknown or revoked.",
                      headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]
