"""Short-lived tokens for one task's event stream, for browsers' EventSource (which cannot send headers).

A token names an API key, the task and an expiry, signed with HMAC-SHA256 under that key's stored
hash: only the server (which holds the hash) can make one, every API replica can check one without
shared configuration, and revoking the key voids its tokens. The API key itself never goes into a URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from service.db import is_integer_literal


class InvalidToken(ValueError):
    """Malformed, forged, for another task, or expired; the message says which, for the 401."""


@dataclass(frozen=True)
class StreamToken:
    key_id: int
    expires: int  # unix seconds

    @classmethod
    def parse(cls, token: str) -> "StreamToken":
        """The token's fields as plain decimals, its key id within the database's integer column: a key
        id of 2147483648 reached PostgreSQL as an out-of-range parameter and answered 500."""
        parts = token.split(".")
        if len(parts) != 3 or not is_integer_literal(parts[0]) or not (
                parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 12):
            raise InvalidToken("not a stream token made by POST /tasks/{id}/events/token")
        return cls(int(parts[0]), int(parts[1]))


def _signature(key_hash: str, task_id: str, key_id: int, expires: int) -> str:
    mac = hmac.new(key_hash.encode(), f"events:{task_id}:{key_id}:{expires}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def mint(key_hash: str, key_id: int, task_id: str, expires: int) -> str:
    return f"{key_id}.{expires}.{_signature(key_hash, task_id, key_id, expires)}"


def verify(token: str, key_hash: str, task_id: str, now: float) -> None:
    """Raises InvalidToken unless `token` was minted under this key for this task and is unexpired."""
    parsed = StreamToken.parse(token)
    expected = mint(key_hash, parsed.key_id, task_id, parsed.expires)
    if not hmac.compare_digest(expected.encode(), token.encode()):
        raise InvalidToken("this token was not made for this task's events (or not by this service)")
    if now >= parsed.expires:
        raise InvalidToken("this token has expired: make a new one with POST /tasks/{id}/events/token")
