"""RFC 9457 problem details. Every error the API returns goes through here."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("upt.service")

# Relative URI references (RFC 9457 allows them): they resolve against wherever the API is served.
PROBLEM_TYPE_BASE = "/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error with an HTTP status and a message that tells the client what to fix."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = PROBLEM_TYPE_BASE + (type or title.lower().replace(" ", "-"))
        self.errors = errors
        self.headers = headers

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body


def invalid(field: str, message: str) -> Problem:
    """A 422 naming the form field at fault, so the web client can show it next to that field."""
    return Problem(422, "Invalid input", f"{field}: {message}", type="invalid-input",
                   errors=[{"field": field, "message": message}])


def not_found(what: str) -> Problem:
    return Problem(404, "Not found", f"{what} does not exist.", type="not-found")


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    instance = request.url.path if request is not None else None
    return JSONResponse(problem.body(instance), status_code=problem.status,
                        media_type=PROBLEM_MEDIA_TYPE, headers=problem.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # loc is ("query", "status", 0) and the like: the client wants the field's name.
        errors = [{"field": next((str(p) for p in e.get("loc", ())[1:] if isinstance(p, str)), "body"),
                   "message": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(Problem(422, "Invalid input", detail, type="invalid-input", errors=errors), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized"}
        title = titles.get(exc.status_code, "HTTP error")
        problem = Problem(exc.status_code, title, str(exc.detail), headers=getattr(exc, "headers", None))
        return problem_response(problem, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with the traceback for the operator; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(500, "Internal error", "The server failed to handle this request; it was logged.")
        return problem_response(problem, request)
