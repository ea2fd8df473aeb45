"""Typed SQLAlchemy models. The task row is the source of truth for a task's state."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def new_task_id() -> str:
    return uuid.uuid4().hex


class TaskStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


FINAL_STATUSES = {TaskStatus.succeeded.value, TaskStatus.failed.value, TaskStatus.cancelled.value}
ACTIVE_STATUSES = {TaskStatus.running.value, TaskStatus.cancelling.value}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Only a SHA-256 of the key is stored; the prefix lets an operator tell keys apart.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_tasks_tenant_idempotency"),
        # GET /tasks: one tenant's tasks, newest first, paged by (created_at, id).
        Index("ix_tasks_tenant_created_id", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_task_id)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # sha256 of the request that created the task under that key: another request under it is a 422.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True, default=TaskStatus.queued.value)

    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    num_images: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    pretrained: Mapped[str] = mapped_column(Text)
    # Of the backbone the API checked the task against: a worker serving other weights refuses it.
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    # Bytes this task keeps on the storage volume (its images, then its artifact): the tenant's quota.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # Every UPDATE of the row adds one, in SQL (no read-modify-write race), unless it says otherwise
    # (`liveness_only`): the ETag of GET /tasks/{id}, and how a poll or a stream tells "changed" cheaply.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1", onupdate=text("version + 1"))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # The worker that holds the task writes heartbeat_at; `lease` changes on every claim so that a
    # worker presumed dead cannot overwrite the row once the task was handed to another one.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    progress: Mapped[float] = mapped_column(Float, default=0.0)
    epoch: Mapped[int | None] = mapped_column(Integer)
    epochs: Mapped[int | None] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)

    # The training-free stage (service.instant): building | ready | failed; null before it is asked for.
    instant_status: Mapped[str | None] = mapped_column(String(16))
    instant_accuracy: Mapped[float | None] = mapped_column(Float)
    instant_error: Mapped[str | None] = mapped_column(Text)
    # Its method (UPT_INSTANT_METHOD when the build started); null while no build has started.
    instant_method: Mapped[str | None] = mapped_column(String(32))
    # The build that holds the stage (claimed by compare-and-set, so one replica builds it) and when it
    # was claimed; once ready, the stage's folder is `instant-<build>` (null: the folder `instant`).
    instant_build: Mapped[str | None] = mapped_column(String(32))
    instant_claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    events: Mapped[list[TaskEvent]] = relationship(
        back_populates="task", cascade="all, delete-orphan", passive_deletes=True, order_by="TaskEvent.id"
    )


def liveness_only() -> dict[str, Any]:
    """Extra values for an UPDATE that writes only what no response shows (a heartbeat, a re-sent
    message): `version` and `updated_at` keep their values, so pollers' ETags stay valid."""
    return {"version": Task.version, "updated_at": Task.updated_at}


class TaskEvent(Base):
    """Epoch-by-epoch history. One row per (task, epoch): a repeated epoch would overwrite it."""

    __tablename__ = "task_events"
    __table_args__ = (UniqueConstraint("task_id", "kind", "epoch", name="uq_task_events_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    task: Mapped[Task] = relationship(back_populates="events")


class IdempotencyLock(Base):
    """A POST /tasks under an Idempotency-Key that is still being processed (uploading, decoding): a
    retry meanwhile is a 409, on whichever API replica it lands. Removed when the request ends; one
    left by a killed process is taken over after UPT_IDEMPOTENCY_LOCK_STALE_S."""

    __tablename__ = "idempotency_locks"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TaskCandidate(Base):
    """method=auto: one candidate method of a task, trained by a job of its own (the `upt.train_candidate`
    message) that any free worker can take. It has its own status, lease and heartbeat, so
    candidates train on several workers at once and a dead worker loses only its candidate. The
    transitions are service.task_state's."""

    __tablename__ = "task_candidates"

    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # in the task's candidate list
    method: Mapped[str] = mapped_column(String(32))
    # queued | running | succeeded | failed | cancelled
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.queued.value)
    lease: Mapped[str | None] = mapped_column(String(32))
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Its share of the task's progress: `fraction` of its own `epochs` (0 for a training-free method).
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    # Once succeeded: its leaderboard row (upt.auto.LeaderboardRow).
    row: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class StreamTokenUse(Base):
    """A stream token that has opened its stream: each opens one (a URL in a log or a Referer header is
    no key to the stream). Kept until the token expires, then swept."""

    __tablename__ = "stream_token_uses"

    signature: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
