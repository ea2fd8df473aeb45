"""Open event streams per tenant in this API process, bounded (UPT_TENANT_MAX_STREAMS): each stream
polls the database on the shared thread pool, so one tenant's hundreds of streams slowed every
request of every tenant. One more is a 429 with Retry-After."""

from __future__ import annotations

import threading

from service.errors import Problem

RETRY_AFTER_S = 30


class StreamSlots:
    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant  # 0: no limit
        self._open: dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self, tenant_id: int) -> None:
        """One slot of the tenant's, or a 429; `give_back(tenant_id)` when the stream ends."""
        with self._lock:
            held = self._open.get(tenant_id, 0)
            if self.per_tenant and held >= self.per_tenant:
                raise Problem(429, "Too many streams", f"This tenant has {held} event streams open on this API "
                              f"process, its limit (UPT_TENANT_MAX_STREAMS={self.per_tenant}); close one, or poll "
                              "GET /tasks/{id} instead.", type="tenant-stream-limit",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
            self._open[tenant_id] = held + 1

    def give_back(self, tenant_id: int) -> None:
        with self._lock:
            left = self._open.get(tenant_id, 0) - 1
            if left > 0:
                self._open[tenant_id] = left
            else:
                self._open.pop(tenant_id, None)

    def open_streams(self, tenant_id: int) -> int:
        with self._lock:
            return self._open.get(tenant_id, 0)
