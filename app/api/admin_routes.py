"""Operator endpoints under /v1/admin: dead letters, breaker reset, audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.api.auth import require_admin
from app.api.context import Ctx
from app.api.pagination import Cursor, Limit, bad_cursor, decode_cursor, encode_cursor, valid_offset
from app.api.problems import Problem
from app.api.registry_routes import PROBLEMS, NamePath
from app.api.schemas import AuditOut, DeadLetterOut, DiscardRequest, Page, ServiceOut
from app.domain.definition import NAME_PATTERN
from app.domain.states import DeadLetterStatus
from app.store.admin import ActionResult

router = APIRouter(prefix="/v1/admin", responses={403: {"description": "Not the admin token"}})
Actor = Annotated[str, Depends(require_admin)]


def _answer(result: ActionResult, message: str, response: Response) -> None:
    if result is ActionResult.NOT_FOUND:
        raise Problem(404, message, slug="unknown-dead-letter")
    if result is ActionResult.CONFLICT:
        raise Problem(409, message, slug="dead-letter-conflict")
    response.status_code = 200 if result is ActionResult.ALREADY else 202


@router.get(
    "/dead-letters", response_model=Page, summary="Dead letters, newest first", responses=PROBLEMS
)
async def list_dead_letters(
    ctx: Ctx,
    _actor: Actor,
    status: DeadLetterStatus | None = None,
    definition: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    service: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page:
    before = None
    raw = decode_cursor(cursor)
    if raw is not None:
        try:
            before = (datetime.fromisoformat(raw[0]), uuid.UUID(raw[1]))
        except (TypeError, ValueError, IndexError, KeyError):
            raise bad_cursor() from None
    views = await ctx.admin.dead_letters(limit, status, definition, service, before)
    next_cursor = None
    if len(views) == limit:
        next_cursor = encode_cursor([views[-1].created_at.isoformat(), str(views[-1].id)])
    return Page(items=[DeadLetterOut.of(v) for v in views], next_cursor=next_cursor)


@router.get(
    "/dead-letters/{dl_id}",
    response_model=DeadLetterOut,
    responses=PROBLEMS,
    summary="One dead letter",
)
async def get_dead_letter(dl_id: uuid.UUID, ctx: Ctx, _actor: Actor) -> DeadLetterOut:
    view = await ctx.admin.dead_letter(dl_id)
    if view is None:
        raise Problem(404, f"no dead letter with id {dl_id}", slug="unknown-dead-letter")
    return DeadLetterOut.of(view)


@router.post(
    "/dead-letters/{dl_id}/retry",
    response_model=DeadLetterOut,
    status_code=202,
    summary="Run the step or compensation again with fresh attempts and the same key",
    responses={
        200: {"description": "Already retried"},
        409: {"description": "Not retryable"},
        **PROBLEMS,
    },
)
async def retry_dead_letter(
    dl_id: uuid.UUID, ctx: Ctx, actor: Actor, response: Response
) -> DeadLetterOut:
    result, message = await ctx.admin.retry_dead_letter(dl_id, actor)
    _answer(result, message, response)
    return await get_dead_letter(dl_id, ctx, actor)


@router.post(
    "/dead-letters/{dl_id}/discard",
    response_model=DeadLetterOut,
    status_code=202,
    summary="Close a dead letter without running it, with a reason",
    responses={
        200: {"description": "Already discarded"},
        409: {"description": "Retried"},
        **PROBLEMS,
    },
)
async def discard_dead_letter(
    dl_id: uuid.UUID, body: DiscardRequest, ctx: Ctx, actor: Actor, response: Response
) -> DeadLetterOut:
    result, message = await ctx.admin.discard_dead_letter(dl_id, actor, body.reason)
    _answer(result, message, response)
    return await get_dead_letter(dl_id, ctx, actor)


@router.post(
    "/services/{name}/circuit/reset",
    response_model=ServiceOut,
    summary="Close a service's circuit now",
    responses=PROBLEMS,
)
async def reset_circuit(name: NamePath, ctx: Ctx, actor: Actor) -> ServiceOut:
    if not await ctx.admin.reset_circuit(name, actor):
        raise Problem(404, f"no service named '{name}'", slug="unknown-service")
    record = await ctx.registry.get_service(name)
    if record is None:
        raise Problem(404, f"no service named '{name}'", slug="unknown-service")
    return ServiceOut.of(record)


@router.get(
    "/audit", response_model=Page, summary="Admin actions, newest first", responses=PROBLEMS
)
async def audit_log(ctx: Ctx, _actor: Actor, limit: Limit = 50, cursor: Cursor = None) -> Page:
    before = decode_cursor(cursor)
    if before is not None and not valid_offset(before):
        raise bad_cursor()
    rows = await ctx.admin.audit_log(limit, before)
    next_cursor = encode_cursor(rows[-1]["id"]) if len(rows) == limit else None
    return Page(items=[AuditOut.model_validate(r) for r in rows], next_cursor=next_cursor)
