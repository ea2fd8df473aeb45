"""API keys. Each key belongs to a tenant; only a SHA-256 of the key is stored.

Key logic only (hashing, creating, looking up); the request dependency that turns a request's key
into its tenant is `service.api.deps.current_tenant`.

Keys are 256 random bits, so a plain (unsalted) SHA-256 is enough: there is nothing to brute-force,
and the hash can be looked up directly with a unique index.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant

KEY_PREFIX = "upt_"
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant
    try:
        with session.begin_nested():
            tenant = Tenant(name=name)
            session.add(tenant)
    except IntegrityError:  # created concurrently by another request
        tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    assert tenant is not None
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """Create a key for the tenant (created if new) and return it; it cannot be shown again."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def tenant_of_key(session: Session, key: str) -> Tenant | None:
    """The tenant of an active (not revoked) key, in one query for key and tenant: every poll pays for it."""
    return session.scalar(select(Tenant).join(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                                            ApiKey.revoked_at.is_(None)))
