"""A time limit on a request's headers (UPT_HEADER_TIMEOUT_S), against slowloris: uvicorn bounds their
size (h11_max_incomplete_event_size) and the idle time between requests (timeout_keep_alive), but not
how long a client may take to send them, so 300 connections sending a header byte every 5 s stayed
open for ever, no key needed. The clock runs from the connection's start, or from the first byte of
each next request on a kept-alive connection, until the headers are complete; past it the client gets
408 and the connection is closed. The body has its own limits (service.timeouts)."""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: 31\r\n\r\nRequest headers took too long.\n")


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's headers are still incomplete
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()


def header_timeout_protocol(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The h11 protocol class for uvicorn's `http=`, with this limit."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})


def server_options(settings) -> dict:
    """uvicorn's HTTP options of `upt serve`: h11, whose parser bounds the request line and headers
    (UPT_MAX_HEADER_BYTES), the time the headers may take (UPT_HEADER_TIMEOUT_S), and idle keep-alive
    closed after 5 s."""
    return {"http": header_timeout_protocol(settings.header_timeout_s),
            "h11_max_incomplete_event_size": settings.max_header_bytes, "timeout_keep_alive": 5}
