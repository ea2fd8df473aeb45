"""Cheap polling: ETags from task versions, `If-None-Match` -> 304, and when to poll again.

A task's ETag is its row version (bumped by every visible change, see `Task.version`) plus a tag of
the response schema, so a deploy that changes what a task looks like invalidates every cached copy.
A list's ETag hashes the (id, version) pairs of its page: it changes when an item changes, appears,
goes or moves. Both are computed from two small columns, so a 304 never reads a whole row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fastapi import Response

from service.models import FINAL_STATUSES
from service.schemas import TaskOut

# A running task changes every second or so; a client should not come back sooner than this.
POLL_AGAIN_S = 2
_SCHEMA_TAG = hashlib.sha256(",".join(TaskOut.model_fields).encode()).hexdigest()[:8]


def task_etag(version: int) -> str:
    return f'"{version}-{_SCHEMA_TAG}"'


def list_etag(tenant_id: int, rows: Iterable[tuple[str, int]], query: str) -> str:
    digest = hashlib.sha256(f"{_SCHEMA_TAG}|{tenant_id}|{query}".encode())
    for task_id, version in rows:
        digest.update(f"|{task_id}:{version}".encode())
    return f'"l-{digest.hexdigest()[:32]}"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison: `*`, or any listed tag equal to ours once `W/` is dropped."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def poll_headers(etag: str, statuses: Iterable[str]) -> dict[str, str]:
    """ETag, revalidate-every-time caching (a browser then sends If-None-Match by itself), and a
    Retry-After while anything shown may still change on its own."""
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "Vary": "Authorization, X-API-Key"}
    if any(status not in FINAL_STATUSES for status in statuses):
        headers["Retry-After"] = str(POLL_AGAIN_S)
    return headers


def not_modified(headers: dict[str, str]) -> Response:
    return Response(status_code=304, headers=headers)


def json_response(body: str, headers: dict[str, str]) -> Response:
    return Response(body, media_type="application/json", headers=headers)
