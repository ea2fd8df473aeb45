"""Per-tenant quotas, so that one tenant cannot fill the queue or the storage volume for everyone.

- UPT_TENANT_MAX_ACTIVE_TASKS: queued, running and cancelling tasks of one tenant; one more is a 429
  with Retry-After (the queue drains, the client retries).
- UPT_TENANT_MAX_STORED_BYTES: the bytes a tenant's tasks keep (their images and artifacts); a task
  that would go past it is a 507 (deleting tasks frees space). 0 turns either off.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import Problem
from service.models import Task, TaskStatus, Tenant
from service.settings import Settings

ACTIVE = (TaskStatus.queued.value, TaskStatus.running.value, TaskStatus.cancelling.value)
RETRY_AFTER_S = 30


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


def check_stored_bytes(session: Session, tenant: Tenant, settings: Settings, adding: int) -> None:
    limit = settings.tenant_max_stored_bytes
    if not limit:
        return
    used = stored_bytes(session, tenant)
    if used + adding > limit:
        raise Problem(507, "Storage quota exceeded", f"This tenant's tasks keep {used} bytes; {adding} more would "
                      f"pass its quota (UPT_TENANT_MAX_STORED_BYTES={limit}). Delete tasks to free space.",
                      type="tenant-storage-quota")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
