"""Shared dependencies of the routes: the per-process serving cache, storage, metrics and training queue."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.batching import MicroBatcher
from service.instant import InstantStages
from service.prometheus import Metrics
from service.queue import TrainingQueue
from service.serving_cache import ServingCache
from service.storage import Storage


def get_serving(request: Request) -> ServingCache:
    return request.app.state.serving


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


def get_instant(request: Request) -> InstantStages:
    return request.app.state.instant


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_queue(request: Request) -> TrainingQueue:
    return request.app.state.queue


ServingDep = Annotated[ServingCache, Depends(get_serving)]
StorageDep = Annotated[Storage, Depends(get_storage)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
InstantDep = Annotated[InstantStages, Depends(get_instant)]
QueueDep = Annotated[TrainingQueue, Depends(get_queue)]
