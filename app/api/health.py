"""`/healthz` (the process answers) and `/readyz` (database reachable, schema at head)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.context import Ctx
from app.api.problems import problem_response
from app.store.migrate import head_revision

router = APIRouter()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "Not ready"}})
async def readyz(ctx: Ctx) -> Any:
    try:
        async with ctx.engine.connect() as conn:
            current = (
                await conn.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one_or_none()
    except Exception as exc:
        return problem_response(
            503,
            f"database not reachable: {type(exc).__name__}",
            slug="not-ready",
            headers={"Retry-After": "2"},
        )
    head = head_revision()
    if current != head:
        return problem_response(
            503,
            f"database schema is at {current}, expected {head}: run migrate",
            slug="not-ready",
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "schema": current})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: Ctx) -> Response:
    shared = await ctx.stats.shared_figures()
    return Response(ctx.metrics.render(shared), media_type=CONTENT_TYPE_LATEST)
