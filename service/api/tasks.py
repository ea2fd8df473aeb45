"""/tasks: create (202 + Location), list, get, cancel, delete, artifact download (events: service.api.events)."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.api.conditional import json_response, list_etag, matches, not_modified, poll_headers, task_etag
from service.api.deps import InstantDep, QueueDep, ServingDep, SessionDep, SettingsDep, StorageDep, TenantDep
from service.api.forms import TASK_FORM
from service.db import commit_retrying_conflicts, db_now, release_connection
from service.errors import Problem, invalid, not_found, shown_weights
from service.instant import instant_key
from service import task_state
from service.models import FINAL_STATUSES, IdempotencyLock, Task, TaskStatus, Tenant, as_utc, new_task_id
from service.quotas import check_active_tasks, check_stored_bytes, folder_bytes, hold_tenant
from service.schemas import TaskOut, TaskPage
from service.settings import Settings
from service.storage import Storage
from service.task_input import TaskSpec, parse_checked_task_form, write_dataset
from service.uploads import (check_declared_length, declared_length, parse_form, remove, request_fingerprint,
                             scratch_dir)

router = APIRouter(tags=["tasks"])
# A POST /tasks holding its Idempotency-Key longer than this was cut short (its process killed).


def _is_task_id(value: str) -> bool:
    return value.isascii() and value.isalnum() and len(value) <= 32


def tenant_task(session: Session, tenant: Tenant, task_id: str) -> Task:
    """The task if it belongs to this tenant; another tenant's task is indistinguishable from none."""
    task = session.get(Task, task_id) if _is_task_id(task_id) else None
    if task is None or task.tenant_id != tenant.id:
        raise not_found(f"Task {task_id}")
    return task


def accepted(task: Task, replayed: bool = False) -> Response:
    headers = {"Location": f"/tasks/{task.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    # model_dump_json writes a NaN loss (a diverged training, replayed) as null; JSONResponse refused it.
    return Response(TaskOut.of(task).model_dump_json(), status_code=202, headers=headers,
                    media_type="application/json")


def _by_idempotency_key(session: Session, tenant: Tenant, key: str | None) -> Task | None:
    if not key:
        return None
    return session.scalar(select(Task).where(Task.tenant_id == tenant.id, Task.idempotency_key == key))


@router.post("/tasks", status_code=202, response_model=TaskOut, openapi_extra=TASK_FORM,
             responses={202: {"description": "Task queued; `Location` names it."}})
async def create_task(request: Request, tenant: TenantDep, session: SessionDep, settings: SettingsDep,
                      serving: ServingDep, storage: StorageDep, instant: InstantDep, queue: QueueDep,
                      idempotency_key: Annotated[str | None, Header(max_length=200)] = None):
    """Multipart form: `class_names` (repeated), `files` + `labels` (repeated) or one `archive` zip,
    `method`, optional `shots`, `epochs`, `seed`, `n_ctx`, `depth`, `ctx_init`, `lr`, `batch_size`."""
    # An empty header is no key: stored as "", it made every later keyless-but-empty request collide.
    idempotency_key = (idempotency_key or "").strip() or None
    existing = await run_in_threadpool(_by_idempotency_key, session, tenant, idempotency_key)
    locked = False
    if idempotency_key and existing is None:
        locked = await run_in_threadpool(_lock_key, session, tenant, idempotency_key, settings.idempotency_lock_stale_s)
        if not locked:  # the task was created between the look-up and the lock
            existing = await run_in_threadpool(_by_idempotency_key, session, tenant, idempotency_key)
    if existing is None:
        try:
            await run_in_threadpool(_check_quotas, session, tenant, settings, storage, request)
        except Problem:
            if locked:
                await run_in_threadpool(_unlock_key, session, tenant, idempotency_key)
            raise
    await run_in_threadpool(release_connection, session)  # the body can take minutes to arrive
    scratch = scratch_dir(storage.root / "tmp")
    try:
        # The body is read even for a replay: only its fingerprint tells a retry from another request.
        form = await parse_form(request, scratch, max_files=settings.max_files,
                                max_file_bytes=settings.max_file_bytes, max_total_bytes=settings.max_upload_bytes)
        fingerprint = request_fingerprint(form)
        if existing is not None:
            return accepted(_same_request(existing, fingerprint), replayed=True)
        # Checked against the architecture's config, before and without the backbone's weights.
        spec = await run_in_threadpool(parse_checked_task_form, form, settings)
        backbone = await run_in_threadpool(serving.backbone)  # 503 with advice if the backbone cannot load
        task, replayed = await run_in_threadpool(_create, session, tenant, settings, storage, spec, idempotency_key,
                                                 backbone, fingerprint)
    finally:
        remove(scratch)
        if locked:
            await run_in_threadpool(_unlock_key, session, tenant, idempotency_key)
    if not replayed:
        # Both only after the row is committed. The instant stage is built here, in the API process,
        # not by a worker, so a full queue cannot delay a task's first answer (see service.instant).
        instant.schedule(task.id)
        if task.method == task_state.AUTO:  # a message per candidate, for any free worker
            await run_in_threadpool(queue.enqueue_candidates, task.id, list(task.config["candidates"]))
        else:
            await run_in_threadpool(queue.enqueue, task.id)
    return accepted(task, replayed)


def _check_quotas(session: Session, tenant: Tenant, settings: Settings, storage: Storage, request: Request) -> None:
    """Before the body is read: its declared size against the request's limit (413: no quota can take
    more than one request may send), the tenant's queue share, and its storage with that size."""
    check_declared_length(request, settings.max_upload_bytes)
    check_active_tasks(session, tenant, settings)
    check_stored_bytes(session, tenant, settings, storage, declared_length(request))


def _lock_key(session: Session, tenant: Tenant, key: str, stale_after_s: float) -> bool:
    """Take the key for this request: True if taken, False if its task exists by now; a 409 while another
    request under it is still being processed (a lock older than UPT_IDEMPOTENCY_LOCK_STALE_S was left by
    a killed process). Lock times are the database's clock: replicas' clocks may disagree."""
    try:
        session.add(IdempotencyLock(tenant_id=tenant.id, key=key, created_at=db_now(session)))
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
    now = db_now(session)
    taken_over = session.execute(update(IdempotencyLock).where(
        IdempotencyLock.tenant_id == tenant.id, IdempotencyLock.key == key,
        IdempotencyLock.created_at < now - timedelta(seconds=stale_after_s),
    ).values(created_at=now)).rowcount
    session.commit()
    if taken_over:
        return True
    if _by_idempotency_key(session, tenant, key) is not None:
        return False
    held = session.scalar(select(IdempotencyLock.created_at).where(IdempotencyLock.tenant_id == tenant.id,
                                                                  IdempotencyLock.key == key))
    age = (now - as_utc(held)).total_seconds() if held is not None else 0.0
    left = max(1, int(stale_after_s - age))
    raise Problem(409, "Request in progress", "A request with this Idempotency-Key is still being processed; "
                  "retry once it has finished to get its answer. Were its process killed, the key is taken over "
                  f"in {left}s (UPT_IDEMPOTENCY_LOCK_STALE_S).", type="idempotency-key-in-use",
                  headers={"Retry-After": str(idempotency_retry_after(age, left))})


def idempotency_retry_after(age_s: float, left_s: int) -> int:
    """Seconds to wait before retrying under a held key: soon while the holder is young (its upload may
    be ending), then half its age (a holder whose process died keeps the key until it is stale, up to
    UPT_IDEMPOTENCY_LOCK_STALE_S: one retry a second for 20 minutes helped nobody), never past the takeover."""
    return max(1, min(int(age_s / 2), left_s))


def _unlock_key(session: Session, tenant: Tenant, key: str) -> None:
    if session.in_transaction():  # a request that failed half-way; a committed task's row stays loaded
        session.rollback()
    session.execute(delete(IdempotencyLock).where(IdempotencyLock.tenant_id == tenant.id, IdempotencyLock.key == key))
    session.commit()


def _same_request(task: Task, fingerprint: str) -> Task:
    """The task of a retry; a different request under the same key is refused (IETF Idempotency-Key draft)."""
    if task.request_fingerprint is not None and task.request_fingerprint != fingerprint:
        raise Problem(422, "Idempotency-Key reused", "This Idempotency-Key was used for a different request "
                      "(other fields or files); use a new key for a new task.", type="idempotency-key-reused",
                      errors=[{"field": "Idempotency-Key", "message": "used before for a different request."}])
    return task


def _create(session: Session, tenant: Tenant, settings: Settings, storage: Storage, spec: TaskSpec,
            idempotency_key: str | None, backbone, fingerprint: str | None) -> tuple[Task, bool]:
    task_id = new_task_id()
    try:
        write_dataset(spec, storage.data_dir(task_id), settings)
        written = folder_bytes(storage.data_dir(task_id))
        # Again in the inserting transaction, the tenant's concurrent creates taking their turn: the
        # checks before the body was read let every one of them through.
        hold_tenant(session, tenant)
        check_active_tasks(session, tenant, settings)
        check_stored_bytes(session, tenant, settings, storage, written)  # what was really stored (PNG, not the upload)
        task = Task(id=task_id, tenant_id=tenant.id, idempotency_key=idempotency_key,
                    request_fingerprint=fingerprint if idempotency_key else None, method=spec.config.method,
                    config=spec.config.to_dict(), class_names=spec.class_names, num_images=len(spec.images),
                    model=settings.model,
                    pretrained=shown_weights(settings.pretrained, backbone.weights_sha256),
                    weights_sha256=backbone.weights_sha256, stored_bytes=written,
                    epochs=spec.config.epochs)
        task_state.add_queued(session, task)
        session.commit()
        return task, False
    except IntegrityError:  # the same Idempotency-Key raced in from a concurrent retry
        session.rollback()
        storage.delete_task(task_id)
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is None:
            raise
        return _same_request(existing, fingerprint), True
    except BaseException:
        storage.delete_task(task_id)
        raise


def _encode_cursor(task: Task) -> str:
    raw = json.dumps([task.created_at.isoformat(), task.id])
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, task_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        # Task ids are hex: anything else (a NUL byte, which PostgreSQL refuses in text) is no cursor.
        if not (isinstance(created, str) and isinstance(task_id, str) and _is_task_id(task_id)):
            raise ValueError(cursor)
        return datetime.fromisoformat(created), task_id
    except (ValueError, TypeError):
        raise invalid("cursor", "not a cursor returned by this API; start again without it.")


NOT_MODIFIED = {304: {"description": "Unchanged since the `ETag` sent as `If-None-Match`."}}


@router.get("/tasks", response_model=TaskPage, responses=NOT_MODIFIED)
def list_tasks(tenant: TenantDep, session: SessionDep,
               status: Annotated[list[TaskStatus] | None, Query()] = None,
               limit: Annotated[int, Query(ge=1, le=100)] = 20,
               cursor: str | None = None,
               if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """Newest first. Pass `next_cursor` back as `cursor` for the next page. Send the `ETag` back as
    `If-None-Match` to get a bodiless 304 while nothing on the page changed."""
    query = select(Task).where(Task.tenant_id == tenant.id)
    if status:
        query = query.where(Task.status.in_([s.value for s in status]))
    if cursor:
        created, task_id = _decode_cursor(cursor)
        query = query.where(or_(Task.created_at < created, and_(Task.created_at == created, Task.id < task_id)))
    query = query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
    asked = f"{sorted(s.value for s in status or [])}|{limit}|{cursor}"
    if if_none_match:  # two small columns of the page first: a 304 reads nothing else
        keys = session.execute(query.with_only_columns(Task.id, Task.version, Task.status)).all()
        etag = list_etag(tenant.id, [(k.id, k.version) for k in keys], asked)
        if matches(if_none_match, etag):
            return not_modified(poll_headers(etag, [k.status for k in keys[:limit]]))
    tasks = session.scalars(query).all()
    next_cursor = _encode_cursor(tasks[limit - 1]) if len(tasks) > limit else None
    page = TaskPage(items=[TaskOut.of(t) for t in tasks[:limit]], next_cursor=next_cursor)
    # From the rows sent, so the tag never names newer content than the body holds.
    etag = list_etag(tenant.id, [(t.id, t.version) for t in tasks], asked)
    return json_response(page.model_dump_json(), poll_headers(etag, [t.status for t in tasks[:limit]]))


@router.get("/tasks/{task_id}", response_model=TaskOut, responses=NOT_MODIFIED)
def get_task(task_id: str, tenant: TenantDep, session: SessionDep,
             if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """Send the `ETag` back as `If-None-Match` to get a bodiless 304 while the task is unchanged;
    `Retry-After` says when a task that is not finished is worth asking about again."""
    if if_none_match and _is_task_id(task_id):  # the version alone: no config, metrics or events read
        row = session.execute(select(Task.version, Task.status)
                              .where(Task.id == task_id, Task.tenant_id == tenant.id)).first()
        if row is not None and matches(if_none_match, task_etag(row.version)):
            return not_modified(poll_headers(task_etag(row.version), [row.status]))
    task = tenant_task(session, tenant, task_id)
    return json_response(TaskOut.of(task).model_dump_json(), poll_headers(task_etag(task.version), [task.status]))


@router.post("/tasks/{task_id}/cancel", status_code=202, response_model=TaskOut)
def cancel_task(task_id: str, tenant: TenantDep, session: SessionDep) -> TaskOut:
    """A queued task is cancelled at once; a running one stops between two training steps."""
    task = tenant_task(session, tenant, task_id)
    if task.status in FINAL_STATUSES:
        raise Problem(409, "Task finished", f"Task {task_id} is already {task.status}; there is nothing to cancel.",
                      type="task-finished")
    task_state.cancel(session, task.id)  # lost to a worker finishing at this instant: the answer shows it
    session.commit()
    session.refresh(task)
    return TaskOut.of(task)


@router.delete("/tasks/{task_id}", status_code=204)
def delete_task(task_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep,
                serving: ServingDep) -> Response:
    """Removes the row, its history, its uploads and its artifact. A running training stops."""
    commit_retrying_conflicts(session, lambda: task_state.delete(session, tenant_task(session, tenant, task_id)))
    storage.delete_task(task_id)
    serving.tuned.discard(task_id)
    serving.tuned.discard(instant_key(task_id))
    return Response(status_code=204)


@router.get("/tasks/{task_id}/artifact", response_class=Response,
            responses={200: {"content": {"application/zip": {}}}})
def download_artifact(task_id: str, tenant: TenantDep, session: SessionDep, storage: StorageDep) -> Response:
    task = tenant_task(session, tenant, task_id)
    if task.status != TaskStatus.succeeded.value or not storage.has_artifact(task_id):
        raise Problem(409, "No artifact yet", f"Task {task_id} is {task.status}; its artifact exists once it has "
                      "succeeded.", type="task-not-finished")
    return Response(storage.artifact_zip(task_id), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="upt-{task_id}.zip"'})
