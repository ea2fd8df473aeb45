"""Per-tenant quotas, so that one tenant cannot fill the queue or the storage volume for everyone.

- UPT_TENANT_MAX_ACTIVE_TASKS: queued, running and cancelling tasks of one tenant; one more is a 429
  with Retry-After (the queue drains, the client retries).
- UPT_TENANT_MAX_STORED_BYTES: the bytes a tenant's tasks keep (their images and artifacts, and the
  epoch checkpoints of those still training, read from the volume: a long training's checkpoints are
  not in any row until it ends); a task that would go past it is a 507 (deleting tasks frees space).
  0 turns either off.

Both are checked twice: before a body is read (to refuse early), and again in the transaction that
inserts the task, after `hold_tenant` has made the tenant's concurrent creates take their turn, so
six creates released at once against a limit of two make two tasks, not six.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.errors import Problem
from service.models import Task, TaskStatus, Tenant
from service.settings import Settings
from service.storage import Storage

ACTIVE = (TaskStatus.queued.value, TaskStatus.running.value, TaskStatus.cancelling.value)
RETRY_AFTER_S = 30


def hold_tenant(session: Session, tenant: Tenant) -> None:
    """Locks the tenant's row until this transaction ends (a write: PostgreSQL's row lock, SQLite's
    write lock), so that its quota counts below see every task a concurrent create has committed."""
    session.execute(update(Tenant).where(Tenant.id == tenant.id).values(name=Tenant.name))


def check_active_tasks(session: Session, tenant: Tenant, settings: Settings) -> None:
    limit = settings.tenant_max_active_tasks
    if not limit:
        return
    active = session.scalar(select(func.count()).select_from(Task).where(Task.tenant_id == tenant.id,
                                                                         Task.status.in_(ACTIVE)))
    if active >= limit:
        raise Problem(429, "Too many tasks", f"This tenant has {active} tasks queued or running, its limit "
                      f"(UPT_TENANT_MAX_ACTIVE_TASKS={limit}); retry when some have finished.",
                      type="tenant-task-quota", headers={"Retry-After": str(RETRY_AFTER_S)})


def stored_bytes(session: Session, tenant: Tenant) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Task.stored_bytes), 0)).where(
        Task.tenant_id == tenant.id)) or 0)


def checkpoint_bytes(session: Session, tenant: Tenant, storage: Storage) -> int:
    """The epoch checkpoints of the tenant's active tasks, on the volume now (a few files per task, and
    at most UPT_TENANT_MAX_ACTIVE_TASKS tasks: cheap to walk on every request)."""
    active = session.scalars(select(Task.id).where(Task.tenant_id == tenant.id, Task.status.in_(ACTIVE))).all()
    return sum(folder_bytes(storage.checkpoint_dir(task_id)) for task_id in active)


def check_stored_bytes(session: Session, tenant: Tenant, settings: Settings, storage: Storage, adding: int) -> None:
    limit = settings.tenant_max_stored_bytes
    if not limit:
        return
    kept, training = stored_bytes(session, tenant), checkpoint_bytes(session, tenant, storage)
    if kept + training + adding > limit:
        raise Problem(507, "Storage quota exceeded",
                      f"This tenant's tasks keep {kept + training} bytes ({training} of them checkpoints of "
                      f"trainings in progress); {adding} more would pass its quota "
                      f"(UPT_TENANT_MAX_STORED_BYTES={limit}). Delete tasks to free space.",
                      type="tenant-storage-quota")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
