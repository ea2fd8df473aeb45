"""Response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from service.errors import shown_weights, without_paths
from service.models import Task, TaskEvent, as_utc


# The tuned stage's state for each task status: it answers once the training has succeeded.
TUNED_STATES = {"queued": "queued", "running": "training", "cancelling": "training", "succeeded": "ready",
                "failed": "failed", "cancelled": "cancelled"}


class StageOut(BaseModel):
    """One way a task can answer /classify: `instant` (a training-free method, GDA by default, built
    seconds after creation) or `tuned` (the task's method, once trained)."""

    state: str  # instant: pending | building | ready | failed; tuned: queued | training | ready | failed | cancelled
    method: str | None  # instant: None until its build starts (UPT_INSTANT_METHOD then)
    val_accuracy: float | None
    error: str | None = None

    @classmethod
    def of(cls, task: Task) -> dict[str, "StageOut"]:
        metrics = task.metrics or {}
        return {
            "instant": cls(state=task.instant_status or "pending", method=task.instant_method,
                           val_accuracy=task.instant_accuracy, error=task.instant_error),
            "tuned": cls(state=TUNED_STATES.get(task.status, task.status), method=task.method,
                         val_accuracy=metrics.get("val_accuracy"), error=task.error),
        }


class TaskOut(BaseModel):
    id: str
    status: str
    method: str
    class_names: list[str]
    num_images: int
    config: dict[str, Any]
    model: str
    pretrained: str
    progress: float
    epoch: int | None
    epochs: int | None
    loss: float | None
    accuracy: float | None
    eta_s: float | None
    metrics: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    stages: dict[str, StageOut]
    links: dict[str, str]

    @classmethod
    def of(cls, task: Task) -> "TaskOut":
        base = f"/tasks/{task.id}"
        links = {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel"}
        if task.status == "succeeded":
            links["artifact"] = f"{base}/artifact"
            links["export"] = f"{base}/export"  # ?format=onnx (the default) or openvino
        return cls(
            id=task.id, status=task.status, method=task.method, class_names=task.class_names,
            num_images=task.num_images, config=task.config, model=task.model,
            pretrained=shown_weights(task.pretrained),
            progress=task.progress, epoch=task.epoch, epochs=task.epochs, loss=task.loss,
            accuracy=task.accuracy, eta_s=task.eta_s, metrics=task.metrics, error=without_paths(task.error),
            attempts=task.attempts, created_at=as_utc(task.created_at), updated_at=as_utc(task.updated_at),
            started_at=as_utc(task.started_at), finished_at=as_utc(task.finished_at), links=links,
            stages=StageOut.of(task),
        )


class TaskPage(BaseModel):
    items: list[TaskOut]
    next_cursor: str | None


class EventOut(BaseModel):
    """`epoch`: one training epoch (method=auto: numbered across candidates, with `data.candidate` and
    `data.worker`, the worker that trained it); `candidate`: method=auto finished a candidate (`epoch` is
    its index, `attempt` the candidate's, `data` its leaderboard row and `worker`);
    `handback`: a worker serving another backbone handed the task back untrained (`epoch` numbers the
    hand-backs, `data` says which worker and why)."""

    kind: str
    epoch: int
    attempt: int
    created_at: datetime
    data: dict[str, Any]

    @classmethod
    def of(cls, event: TaskEvent) -> "EventOut":
        return cls(kind=event.kind, epoch=event.epoch, attempt=event.attempt, created_at=as_utc(event.created_at),
                   data=event.data)


class EventPage(BaseModel):
    task_id: str
    items: list[EventOut]


class Label(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    filename: str
    labels: list[Label]


class ClassifyOut(BaseModel):
    task_id: str | None
    stage: str  # what answered: instant (training-free cache), tuned (trained), or zero-shot
    class_names: list[str]
    predictions: list[ImagePrediction]


class CheckOut(BaseModel):
    ok: bool
    detail: str


class ReadyOut(BaseModel):
    ready: bool
    checks: dict[str, CheckOut]


class StreamTokenOut(BaseModel):
    """For EventSource: `url` (relative to the API) streams the task's events without any header."""

    url: str
    token: str | None
    expires_at: datetime | None
