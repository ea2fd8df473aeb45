"""API keys. Each key belongs to a tenant; only a SHA-256 of the key is stored.

Keys are 256 random bits, so a plain (unsalted) SHA-256 is enough: there is nothing to brute-force,
and the hash can be looked up directly with a unique index.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import get_sessionmaker
from service.errors import Problem
from service.models import ApiKey, Tenant
from service.settings import Settings, get_settings

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


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def current_tenant(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Tenant:
    key = presented_key(request)
    if key is None:
        if settings.api_keys_required:
            raise Problem(401, "Unauthorized", "Send an API key as `Authorization: Bearer KEY` "
                          "(create one with `upt keys create --tenant NAME`).",
                          headers={"WWW-Authenticate": "Bearer"})
        tenant = get_or_create_tenant(session, LOCAL_TENANT)
        session.commit()
        return tenant
    # One query for key and tenant: every poll pays for it.
    tenant = session.scalar(select(Tenant).join(ApiKey).where(ApiKey.key_hash == hash_key(key),
                                                              ApiKey.revoked_at.is_(None)))
    if tenant is None:
        raise Problem(401, "Unauthorized", "This API key is unknown or revoked.",
                      headers={"WWW-Authenticate": "Bearer"})
    return tenant


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[Tenant, Depends(current_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
