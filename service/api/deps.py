"""Shared dependencies of the routes: the per-process runtime, storage and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.batching import MicroBatcher
from service.instant import InstantStages
from service.prometheus import Metrics
from service.runtime import Runtime
from service.storage import Storage


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


def get_instant(request: Request) -> InstantStages:
    return request.app.state.instant


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
StorageDep = Annotated[Storage, Depends(get_storage)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
InstantDep = Annotated[InstantStages, Depends(get_instant)]
