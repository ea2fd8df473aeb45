"""The OpenAPI document lists every problem a route can answer (RFC 9457 bodies as
application/problem+json), in one table, so the contract and the code cannot drift apart route by route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    field: str
    message: str


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


WHY = {
    400: "Malformed request (e.g. a multipart body cut before its closing boundary)",
    401: "No API key, or an unknown or revoked one",
    404: "No such task for this tenant",
    408: "The request body stalled or took too long (UPT_BODY_IDLE_TIMEOUT_S, UPT_BODY_TIMEOUT_S)",
    409: "Conflict with the task's state, or an Idempotency-Key still in use",
    413: "Too many or too large files or pixels (the detail names the UPT_ setting)",
    415: "Not multipart/form-data",
    422: "Invalid input; `errors` names each field",
    429: "The tenant's quota of queued and running tasks is used up (Retry-After)",
    431: "Request headers too large (UPT_MAX_HEADER_BYTES)",
    501: "This server cannot write that export format (its library is not installed)",
    503: "The database is unavailable or busy, or the backbone is not loaded yet (Retry-After where known)",
    507: "No space left on the storage volume, or the tenant's storage quota",
}

# Every API route can meet a missing key, a stalled body, oversized headers and a database outage.
COMMON = (401, 408, 431, 503)
UPLOAD = COMMON + (400, 413, 415, 422, 507)
PROBLEMS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/tasks"): UPLOAD + (409, 429),
    ("get", "/tasks"): COMMON + (422,),
    ("get", "/tasks/{task_id}"): COMMON + (404,),
    ("get", "/tasks/{task_id}/events"): COMMON + (404, 422),
    ("post", "/tasks/{task_id}/events/token"): COMMON + (404,),
    ("post", "/tasks/{task_id}/cancel"): COMMON + (404, 409),
    ("delete", "/tasks/{task_id}"): COMMON + (404,),
    ("get", "/tasks/{task_id}/artifact"): COMMON + (404, 409),
    ("get", "/tasks/{task_id}/export"): COMMON + (404, 409, 422, 501, 507),
    ("post", "/classify"): UPLOAD + (404, 409),
}


def _problem(status: int) -> dict[str, Any]:
    return {"description": WHY[status],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def document_problems(app: FastAPI) -> None:
    """Wrap app.openapi: add the Problem schema and each route's problem responses (replacing FastAPI's
    default 422, which describes a body this API never sends)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        problem = ProblemOut.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(problem.pop("$defs", {}))
        schemas["Problem"] = problem
        for operations in document.get("paths", {}).values():  # FastAPI's own 422: ours is a problem
            for operation in operations.values():
                if "HTTPValidationError" in str(operation.get("responses", {}).get("422", "")):
                    operation["responses"]["422"] = _problem(422)
        for (method, path), statuses in PROBLEMS.items():
            operation = document.get("paths", {}).get(path, {}).get(method)
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            for status in statuses:
                responses[str(status)] = _problem(status)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi
