"""RFC 9457 problem details. Every error the API returns goes through here."""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.db import is_conflict

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
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status,
                                "detail": without_paths(self.detail)}
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = [{**e, "message": without_paths(e.get("message"))} for e in self.errors]
        return body


def invalid(field: str, message: str) -> Problem:
    """A 422 naming the form field at fault, so the web client can show it next to that field."""
    return Problem(422, "Invalid input", f"{field}: {message}", type="invalid-input",
                   errors=[{"field": field, "message": message}])


def not_found(what: str) -> Problem:
    return Problem(404, "Not found", f"{what} does not exist.", type="not-found")


# An absolute path of two or more components, not inside a URL or a relative name ("T-shirt/top").
_SERVER_PATH = re.compile(r"(?<![\w:/.~-])(?:/[^\s'\"/:,;()\[\]]+){2,}")


def without_paths(text: str | None) -> str | None:
    """`text` with every server path shortened to its last component: errors and health checks say what
    went wrong ("upt-tiny.pt is not a checkpoint") without telling a client how the server is laid out."""
    if not text:
        return text
    return _SERVER_PATH.sub(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def shown_weights(pretrained: str, weights_sha256: str | None = None) -> str:
    """A pretrained tag as is; a checkpoint file as its name and sha256 prefix, never its server path."""
    if os.sep not in pretrained and "/" not in pretrained and not os.path.splitext(pretrained)[1]:
        return pretrained
    name = os.path.basename(pretrained.rstrip("/")) or pretrained
    return f"{name} (sha256 {weights_sha256[:12]})" if weights_sha256 else name


# Errnos that mean the storage volume is full: no space, or the tenant's/user's disk quota.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
DATABASE_RETRY_AFTER_S = 5
NO_SPACE = "no space left on the storage volume"


def _chain(error: BaseException | None) -> list[BaseException]:
    """`error` and the errors it was raised from (its cause or context), each once."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def is_file_too_large(error: BaseException | None) -> bool:
    """True when `error` (or one it was raised from) is a file-size limit (EFBIG: RLIMIT_FSIZE, or the
    filesystem's largest file): not a full volume, and freeing space does not help."""
    return any((isinstance(e, OSError) and e.errno == errno.EFBIG) or "File too large" in str(e)
               or "FileTooLarge" in str(e) for e in _chain(error))


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from, says the disk is full. torch.save reports a
    full disk as a RuntimeError of its zip writer ("unexpected pos"), SQLite as "database or disk is full"."""
    if is_file_too_large(error):  # torch's zip writer words both alike; the cause tells them apart
        return False
    for error in _chain(error):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        text = str(error)
        if "database or disk is full" in text or "No space left on device" in text or (
                isinstance(error, RuntimeError) and "inline_container" in text and "unexpected pos" in text):
            return True
    return False


def file_too_large() -> Problem:
    return Problem(507, "Insufficient storage", "The request cannot be stored: the storage volume refuses a file "
                   "this large (a file-size limit, EFBIG), though it may have space. Nothing of it was kept; "
                   "the operator must raise the limit.", type="file-size-limit")


def disk_full() -> Problem:
    return Problem(507, "Insufficient storage", f"The request cannot be stored: {NO_SPACE}. Nothing of it was "
                   "kept; retry once space was freed.", type="insufficient-storage")


def database_busy() -> Problem:
    return Problem(503, "Database busy", "Every database connection of this API process is in use; retry in a "
                   "few seconds.", type="database-busy", headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})


def database_unavailable() -> Problem:
    return Problem(503, "Database unavailable", "The database cannot be reached right now; retry in a few "
                   "seconds.", type="database-unavailable",
                   headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})


class OutageLog:
    """One log line per outage of a dependency, not a traceback per request: the first failure is
    logged, later ones only once every `every_s` seconds, and the recovery once."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 60.0) -> None:
        self.logger, self.what, self.every_s = logger, what, every_s
        self._last: float | None = None
        self._count = 0

    def failed(self, error: BaseException) -> None:
        self._count += 1
        now = time.monotonic()
        if self._last is None or now - self._last >= self.every_s:
            first_line = (str(error).strip().splitlines() or [""])[0]
            self.logger.error("%s unavailable (%d failure(s) since the last report): %s: %s", self.what,
                              self._count, type(error).__name__, first_line)
            self._last, self._count = now, 0

    def recovered(self) -> None:
        if self._last is not None:
            self.logger.warning("%s reachable again", self.what)
            self._last, self._count = None, 0


# One per process: the API's error handler and the recovery sweeper (which also notices the return) share it.
database_outage = OutageLog(logging.getLogger("upt.database"), "database")


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

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        # The database is down, restarting or unreachable (or, for SQLite, its disk is full): a fault of
        # ours with a name and a Retry-After, not a 500. The pool pre-pings, so it recovers by itself.
        if is_disk_full(exc):
            return problem_response(disk_full(), request)
        if is_conflict(exc):  # a deadlock lost even after retries: the database is busy, not down
            return problem_response(database_busy(), request)
        database_outage.failed(exc)
        return problem_response(database_unavailable(), request)

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(request: Request, exc: PoolTimeout) -> JSONResponse:
        # No connection came free within UPT_DATABASE_POOL_TIMEOUT_S: this process has more requests at
        # the database than UPT_DATABASE_MAX_CONNECTIONS. Overload, not a bug: 503 and retry.
        log.warning("%s %s: no free database connection: %s", request.method, request.url.path,
                    (str(exc).splitlines() or [""])[0])
        return problem_response(database_busy(), request)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        if is_file_too_large(exc):
            log.error("%s %s: a file-size limit (EFBIG): %s", request.method, request.url.path, exc)
            return problem_response(file_too_large(), request)
        if is_disk_full(exc):
            log.error("%s %s: %s", request.method, request.url.path, NO_SPACE)
            return problem_response(disk_full(), request)
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with the traceback for the operator; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        problem = Problem(500, "Internal error", "The server failed to handle this request; it was logged.")
        return problem_response(problem, request)
