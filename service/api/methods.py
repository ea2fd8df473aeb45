"""GET /methods: every method with its options, as the method registry (upt/methods/registry.py)
states them. Public like /livez: it describes the service, not a tenant's data. The web client
builds its method cards and option fields from it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from upt.auto import method_listing

router = APIRouter(tags=["methods"])


class OptionOut(BaseModel):
    name: str
    type: str  # JSON Schema's: integer, number or string
    default: Any = None  # None: the method's own, said in `help`
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool
    exclusive_maximum: bool
    help: str


class MethodOut(BaseModel):
    name: str
    title: str
    description: str
    learns: list[str]  # text, visual, cache; empty: nothing (zero-shot, auto)
    conditional: bool
    uses_cache: bool
    default_depth: str | None
    options: list[OptionOut]


class MethodsOut(BaseModel):
    methods: list[MethodOut]


@router.get("/methods", response_model=MethodsOut)
def list_methods() -> dict[str, Any]:
    """Every method `POST /tasks` accepts (auto first), with the options each takes: type, default,
    limits and help."""
    return {"methods": method_listing()}
