"""`/healthz` (the process answers) and `/readyz` (database reachable, schema at head)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.auth import Tokens, bearer
from app.api.context import Ctx
from app.api.openapi import answer, problems
from app.api.problems import problem_response
from app.api.schemas import HealthOut, ReadyOut

router = APIRouter()
METRICS_EXAMPLE = """# HELP saga_started_total Sagas started
# TYPE saga_started_total counter
saga_started_total{definition="checkout"} 42.0
"""


@router.get(
    "/healthz",
    summary="Liveness",
    response_model=HealthOut,
    responses={**answer(200, "The process answers", {"status": "ok"}), **problems(400, 413)},
)
async def healthz() -> dict[str, str]:
    """`200` while the process serves HTTP; it does not touch the database."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=ReadyOut,
    responses={
        **answer(200, "Ready", {"status": "ready", "schema": "0002_bulkhead"}),
        **problems(
            400,
            413,
            503,
            notes={503: "Not ready: the database is unreachable or its schema is not at head."},
        ),
    },
)
async def readyz(ctx: Ctx) -> Any:
    """`200` when the database answers and its schema is at the latest migration; else
    `503` with `Retry-After`. Load balancers route to ready processes only."""
    try:
        current, head = await ctx.ops.readiness()
    except Exception as exc:
        return problem_response(
            503,
            f"database not reachable: {type(exc).__name__}",
            slug="not-ready",
            headers={"Retry-After": "2"},
        )
    if current != head:
        return problem_response(
            503,
            f"database schema is at {current}, expected {head}: run migrate",
            slug="not-ready",
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "schema": current})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}},
        },
        **problems(400, 401, 413, 503, notes={401: "SAGA_METRICS_TOKEN is set: send it."}),
    },
)
async def metrics(ctx: Ctx, request: Request) -> Response:
    """Counters and histograms of this process (sagas started and finished, attempts,
    durations), plus figures shared by all processes (sagas in flight by status, dead
    letters open, circuit states), in the Prometheus text format. With
    SAGA_METRICS_TOKEN set, it needs `Authorization: Bearer <that token>` (or the admin
    token)."""
    expected = ctx.settings.metrics_token
    if expected is not None:
        given = bearer(request.headers.get("authorization")) or ""
        if not (Tokens.matches(given, expected) or Tokens.matches(given, ctx.tokens.admin)):
            return problem_response(
                401,
                "send Authorization: Bearer <SAGA_METRICS_TOKEN>",
                slug="unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
    shared = await ctx.ops.shared_figures()
    return Response(ctx.metrics.render(shared), media_type=CONTENT_TYPE_LATEST)
