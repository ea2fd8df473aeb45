"""GET /tasks/{id}/events: the epoch history as JSON, or live as server-sent events; and the
short-lived token that lets a browser's EventSource (which cannot send headers) open the stream.

The stream sends `epoch` events (one per finished epoch) and `progress` events (the task as
GET /tasks/{id} shows it, after each change), then `end` when the task has finished. Each event's id
is a cursor `VERSION.EPOCH`: the task version last sent and the last epoch sent. Reconnecting with it
as `Last-Event-ID` (EventSource does so by itself) resumes without repeating or losing an epoch; once
the client has seen `end` (its id ends in `.end`), a reconnection gets 204: EventSource then stops.

A stream token opens one stream; a stream re-checks its API key every KEY_CHECK_S and closes once the
key is revoked; a tenant holds at most UPT_TENANT_MAX_STREAMS open streams per API process (429 past it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from service.api.tasks import tenant_task
from service.api.deps import DatabaseDep, SessionDep, SettingsDep, StreamsDep, TenantDep, current_tenant, presented_key
from service.auth import hash_key
from service.db import Database, db_now, is_integer_literal
from service.errors import Problem, invalid
from service.models import FINAL_STATUSES, ApiKey, StreamTokenUse, Task, TaskEvent, Tenant
from service.schemas import EventOut, EventPage, StreamTokenOut, TaskOut
from service.stream_tokens import InvalidToken, StreamToken, mint, verify

router = APIRouter(tags=["tasks"])
log = logging.getLogger("upt.events")
# How often an open stream looks at the task's version (one two-column query), how long EventSource
# waits before reconnecting, and how often an idle stream says it is alive (proxies drop silent ones).
STREAM_POLL_S = 0.5
RECONNECT_MS = 2000
KEEPALIVE_S = 15.0
# How often an open stream checks that its API key is still active: a revoked key's streams close.
KEY_CHECK_S = 5.0


@dataclass(frozen=True)
class Cursor:
    """Where a client is: the task version and the epoch it saw last, and whether it saw the end."""

    version: int = 0
    epoch: int = 0
    ended: bool = False

    @classmethod
    def parse(cls, value: str | None) -> "Cursor":
        if not value:
            return cls()
        parts = value.split(".")
        # Each number a decimal within the database's integer columns: a larger one reached PostgreSQL
        # as an out-of-range parameter, and the stream closed at once, for ever (EventSource reconnects).
        if (len(parts) not in (2, 3) or parts[2:] not in ([], ["end"])
                or not all(is_integer_literal(part) for part in parts[:2])):
            raise invalid("Last-Event-ID", "not an event id sent by this stream; reconnect without it.")
        return cls(int(parts[0]), int(parts[1]), len(parts) == 3)

    def __str__(self) -> str:
        return f"{self.version}.{self.epoch}" + (".end" if self.ended else "")


@dataclass(frozen=True)
class StreamAccess:
    """Who opens a stream: the tenant, and the API key it came with (None where keys are not required),
    which the stream checks again while it is open: a revoked key's streams close."""

    tenant: Tenant
    key_id: int | None


def stream_access(request: Request, task_id: str, session: SessionDep, settings: SettingsDep,
                  token: Annotated[str | None, Query(max_length=200)] = None) -> StreamAccess:
    """The tenant of an API key in a header, as everywhere, or of a token made for this task's events;
    a token opens one stream (or one history read), once."""
    if token is None:
        tenant = current_tenant(request, session, settings)
        key = presented_key(request)
        return StreamAccess(tenant, None if key is None else session.scalar(
            select(ApiKey.id).where(ApiKey.key_hash == hash_key(key))))
    try:
        parsed = StreamToken.parse(token)
        row = session.execute(select(ApiKey.key_hash, Tenant).join(Tenant)
                              .where(ApiKey.id == parsed.key_id, ApiKey.revoked_at.is_(None))).first()
        if row is None:
            raise InvalidToken("the API key this token was made with is unknown or revoked")
        verify(token, row.key_hash, task_id, now=time.time())
        _use_once(session, token, parsed.expires)
    except InvalidToken as error:
        raise Problem(401, "Unauthorized", str(error), headers={"WWW-Authenticate": "Bearer"}) from None
    return StreamAccess(row.Tenant, parsed.key_id)


def _use_once(session: Session, token: str, expires: int) -> None:
    """Records the token's use; a second use is refused. EventSource reconnects with the same URL after a
    dropped connection: that reconnection is refused, and the web client makes a new token."""
    try:
        with session.begin_nested():
            session.add(StreamTokenUse(signature=token.rsplit(".", 1)[1],
                                       expires_at=datetime.fromtimestamp(expires, timezone.utc)))
        session.commit()
    except IntegrityError:
        session.rollback()
        raise InvalidToken("this token has opened its stream already: make a new one with "
                           "POST /tasks/{id}/events/token") from None


def purge_used_tokens(database: Database) -> int:
    """Removes the records of tokens that have expired (a sweeper chore): they cannot be used anyway."""
    with database.scope() as session:
        return session.execute(delete(StreamTokenUse).where(StreamTokenUse.expires_at < db_now(session))).rowcount


@router.post("/tasks/{task_id}/events/token", response_model=StreamTokenOut)
def make_stream_token(task_id: str, request: Request, tenant: TenantDep, session: SessionDep,
                      settings: SettingsDep) -> StreamTokenOut:
    """A token for `new EventSource(url)` on this task's events, valid for UPT_STREAM_TOKEN_TTL_S to
    connect (the stream then lasts until the task ends). Without API keys (loopback) none is needed."""
    task = tenant_task(session, tenant, task_id)
    url = f"/tasks/{task.id}/events"
    key = presented_key(request)
    if key is None:
        return StreamTokenOut(url=url, token=None, expires_at=None)
    key_id, key_hash = session.execute(select(ApiKey.id, ApiKey.key_hash).where(ApiKey.key_hash == hash_key(key))).one()
    expires = int(time.time() + settings.stream_token_ttl_s)
    token = mint(key_hash, key_id, task.id, expires)
    return StreamTokenOut(url=f"{url}?token={token}", token=token,
                          expires_at=datetime.fromtimestamp(expires, timezone.utc))


@router.get("/tasks/{task_id}/events", response_model=EventPage,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "JSON history, or with `Accept: text/event-stream` a live stream."},
                       204: {"description": "Stream only: the task ended and the client has seen everything."}})
async def task_events(task_id: str, request: Request, access: Annotated[StreamAccess, Depends(stream_access)],
                      session: SessionDep, database: DatabaseDep, streams: StreamsDep,
                      last_event_id: Annotated[str | None, Header(max_length=40)] = None,
                      after: Annotated[str | None, Query(max_length=40, description="as Last-Event-ID")] = None):
    """Epoch history (JSON). With `Accept: text/event-stream`: `epoch`, `progress` and `end` events, live."""
    task = await run_in_threadpool(tenant_task, session, access.tenant, task_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return await run_in_threadpool(_history, session, task)
    cursor = Cursor.parse(last_event_id or after)
    tenant_id = access.tenant.id
    session.close()  # hand the connection back: the stream reads with short sessions of its own
    if cursor.ended:  # a finished task's stream has nothing more to say, ever
        return Response(status_code=204)
    streams.take(tenant_id)  # a 429 past UPT_TENANT_MAX_STREAMS
    return _SlotStream(_stream(database, task.id, tenant_id, cursor, access.key_id),
                       release=lambda: streams.give_back(tenant_id), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _SlotStream(StreamingResponse):
    """A stream that gives its tenant's slot back however it ends: finished, or its client gone (then
    Starlette may cancel it before its generator ever ran, and no `finally` of that would run)."""

    def __init__(self, content, release, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _history(session: Session, task: Task) -> EventPage:
    events = session.scalars(select(TaskEvent).where(TaskEvent.task_id == task.id)
                             .order_by(TaskEvent.kind == "candidate", TaskEvent.epoch)).all()
    return EventPage(task_id=task.id, items=[EventOut.of(e) for e in events])


def _sse(kind: str, data: str, cursor: Cursor) -> str:
    return f"event: {kind}\nid: {cursor}\ndata: {data}\n\n"


def _changes(database: Database, task_id: str, tenant_id: int, cursor: Cursor) -> tuple[list[str], Cursor, str | None] | None:
    """Events since `cursor`, the cursor after them, and the final status if the task has ended;
    None if the task is gone. An unchanged task costs one query of two columns."""
    with database.session() as session:
        seen = session.execute(select(Task.version, Task.status)
                               .where(Task.id == task_id, Task.tenant_id == tenant_id)).first()
        if seen is None:
            return None
        if seen.version == cursor.version:
            return [], cursor, seen.status if seen.status in FINAL_STATUSES else None
        # The row before its events: an epoch committed in between is sent now, and again never,
        # since the next cursor names it; the reverse order could skip it.
        task = session.get(Task, task_id)
        if task is None:
            return None
        chunks = []
        for event in session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.kind == "epoch",
                                                              TaskEvent.epoch > cursor.epoch).order_by(TaskEvent.epoch)):
            cursor = Cursor(cursor.version, event.epoch)
            chunks.append(_sse("epoch", EventOut.of(event).model_dump_json(), cursor))
        cursor = Cursor(task.version, cursor.epoch)
        chunks.append(_sse("progress", TaskOut.of(task).model_dump_json(), cursor))
        return chunks, cursor, task.status if task.status in FINAL_STATUSES else None


def _key_active(database: Database, key_id: int) -> bool:
    with database.session() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))) is not None


async def _stream(database: Database, task_id: str, tenant_id: int, cursor: Cursor,
                  key_id: int | None = None) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    quiet_since = key_checked = time.monotonic()
    while True:
        try:
            if key_id is not None and time.monotonic() - key_checked >= KEY_CHECK_S:
                if not await run_in_threadpool(_key_active, database, key_id):
                    # Closed without `end`: EventSource reconnects, and is refused (401) for good.
                    log.info("event stream of task %s closed: its API key was revoked", task_id)
                    return
                key_checked = time.monotonic()
            changes = await run_in_threadpool(_changes, database, task_id, tenant_id, cursor)
        except SQLAlchemyError as error:  # the client reconnects with its Last-Event-ID
            log.warning("event stream of task %s closed: database error %s", task_id, type(error).__name__)
            return
        chunks, cursor, final = changes if changes is not None else ([], cursor, "deleted")
        for chunk in chunks:
            yield chunk
        if final is not None:
            yield _sse("end", json.dumps({"status": final}), Cursor(cursor.version, cursor.epoch, ended=True))
            return
        if chunks:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(STREAM_POLL_S)
