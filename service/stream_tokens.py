"""Short-lived tokens for one task's event stream, for browsers' EventSource (which cannot send headers).

A token names an API key, the task, an expiry and a random nonce, signed with HMAC-SHA256 under that
key's stored hash: only the server (which holds the hash) can make one, every API replica can check one
without shared configuration, and revoking the key voids its tokens. The API key itself never goes into a
URL. The nonce makes every token unique, so that each can be used once (service.api.events records uses).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from service.db import is_integer_literal

NONCE_BYTES = 12


class InvalidToken(ValueError):
    """Malformed, forged, for another task, expired or used; the message says which, for the 401."""


@dataclass(frozen=True)
class StreamToken:
    key_id: int
    expires: int  # unix seconds
    nonce: str
    signature: str

    @classmethod
    def parse(cls, token: str) -> "StreamToken":
        """The token's fields, its numbers plain decimals and its key id within the database's integer
        column: a key id of 2147483648 reached PostgreSQL as an out-of-range parameter and answered 500."""
        parts = token.split(".")
        if len(parts) != 4 or not is_integer_literal(parts[0]) or not (
                parts[1].isascii() and parts[1].isdigit() and len(parts[1]) <= 12):
            raise InvalidToken("not a stream token made by POST /tasks/{id}/events/token")
        return cls(int(parts[0]), int(parts[1]), parts[2], parts[3])


def _signature(key_hash: str, task_id: str, key_id: int, expires: int, nonce: str) -> str:
    mac = hmac.new(key_hash.encode(), f"events:{task_id}:{key_id}:{expires}:{nonce}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def mint(key_hash: str, key_id: int, task_id: str, expires: int, nonce: str | None = None) -> str:
    nonce = nonce if nonce is not None else secrets.token_urlsafe(NONCE_BYTES)
    return f"{key_id}.{expires}.{nonce}.{_signature(key_hash, task_id, key_id, expires, nonce)}"


def verify(token: str, key_hash: str, task_id: str, now: float) -> StreamToken:
    """The token, unless it was not minted under this key for this task or has expired (InvalidToken)."""
    parsed = StreamToken.parse(token)
    expected = mint(key_hash, parsed.key_id, task_id, parsed.expires, parsed.nonce)
    if not hmac.compare_digest(expected.encode(), token.encode()):
        raise InvalidToken("this token was not made for this task's events (or not by this service)")
    if now >= parsed.expires:
        raise InvalidToken("this token has expired: make a new one with POST /tasks/{id}/events/token")
    return parsed
