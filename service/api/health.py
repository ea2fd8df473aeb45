"""/livez, /readyz and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from service.api.deps import DatabaseDep, MetricsDep, QueueDep, ServingDep, SessionDep, SettingsDep, presented_key
from service.auth import tenant_of_key
from service.db import Database, release_connection
from service.errors import Problem, without_paths
from service.schemas import CheckOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict:
    """The process answers; says nothing about its dependencies."""
    return {"status": "ok"}


def _reachable(database: Database) -> tuple[bool, str]:
    try:
        with database.session() as session:
            session.execute(text("SELECT 1"))
        return True, "reachable"
    except Exception as error:
        return False, f"{type(error).__name__}: {error}"


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(serving: ServingDep, database: DatabaseDep, queue: QueueDep) -> JSONResponse:
    """Database reachable, broker reachable, backbone loadable (and the image encoder that serves it):
    200 when all hold, else 503."""
    checks = {
        "database": await run_in_threadpool(_reachable, database),
        "broker": await run_in_threadpool(queue.reachable),
        "backbone": await run_in_threadpool(serving.backbone_status),
    }
    checks["image_encoder"] = serving.encoder_status()  # which runtime and precision serve /classify
    body = ReadyOut(ready=all(ok for ok, _ in checks.values()),
                    checks={name: CheckOut(ok=ok, detail=without_paths(detail))
                            for name, (ok, detail) in checks.items()})
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request, metrics: MetricsDep, settings: SettingsDep, session: SessionDep) -> Response:
    """Prometheus text format: fleet-wide aggregates, no tenant's own. Open to anyone only as
    UPT_METRICS_PUBLIC says (by default where the API is bound to loopback); else an API key is needed."""
    if not settings.metrics_open:
        key = presented_key(request)
        if key is None or tenant_of_key(session, key) is None:
            raise Problem(401, "Unauthorized", "GET /metrics needs an API key here (UPT_METRICS_PUBLIC): send "
                          "`Authorization: Bearer KEY`.", headers={"WWW-Authenticate": "Bearer"})
        release_connection(session)
    return metrics.render()
