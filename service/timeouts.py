"""Bounds on how long a client may take to send a request body, so slow or stalled uploads cannot hold
connections (and scratch space) open for ever: UPT_BODY_IDLE_TIMEOUT_S without a byte, or
UPT_BODY_TIMEOUT_S for the whole body, is a 408 and the connection is closed. Header size is bounded by
the HTTP parser (UPT_MAX_HEADER_BYTES, see `upt serve`)."""

from __future__ import annotations

import asyncio
import time

from service.errors import Problem, problem_response


def request_timeout(detail: str) -> Problem:
    return Problem(408, "Request timeout", detail, type="request-timeout", headers={"Connection": "close"})


class RequestBoundsMiddleware:
    """Pure ASGI: header bytes are counted once; only the reads of the request body are timed, and once
    the body is complete `receive` is passed through untouched (a streaming response waits on it for the
    client's disconnect)."""

    def __init__(self, app, total_s: float, idle_s: float, max_header_bytes: int) -> None:
        self.app, self.total_s, self.idle_s, self.max_header_bytes = app, total_s, idle_s, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
        if header_bytes > self.max_header_bytes:
            problem = Problem(431, "Request headers too large", f"The request's headers hold {header_bytes} bytes; "
                              f"at most {self.max_header_bytes} (UPT_MAX_HEADER_BYTES).",
                              type="request-headers-too-large", headers={"Connection": "close"})
            return await problem_response(problem)(scope, receive, send)
        start = time.monotonic()
        complete = False

        async def timed_receive():
            nonlocal complete
            if complete:
                return await receive()
            left = self.total_s - (time.monotonic() - start)
            if left <= 0:
                raise request_timeout(f"The request body took longer than {self.total_s:.0f}s "
                                      "(UPT_BODY_TIMEOUT_S).")
            try:
                message = await asyncio.wait_for(receive(), min(self.idle_s, left))
            except asyncio.TimeoutError:
                if self.idle_s <= left:
                    raise request_timeout(f"No part of the request body arrived for {self.idle_s:.0f}s "
                                          "(UPT_BODY_IDLE_TIMEOUT_S).") from None
                raise request_timeout(f"The request body took longer than {self.total_s:.0f}s "
                                      "(UPT_BODY_TIMEOUT_S).") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        return await self.app(scope, timed_receive, send)
