"""Operator endpoints under /v1/admin: dead letters, breaker reset, audit log."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Response

from app.api import examples
from app.api.auth import require_admin
from app.api.context import Ctx
from app.api.openapi import V1, answer, link, problems
from app.api.pagination import (
    Cursor,
    Limit,
    bad_cursor,
    decode_cursor,
    decode_time_cursor,
    encode_cursor,
    time_cursor_after,
    valid_offset,
)
from app.api.registry_routes import NamePath
from app.api.schemas import AuditOut, DeadLetterOut, DiscardRequest, Page, ServiceOut
from app.core.definition import NAME_PATTERN
from app.core.states import DeadLetterStatus
from app.usecases.operations import Done

router = APIRouter(prefix="/v1/admin")
Actor = Annotated[str, Depends(require_admin)]
DeadLetterId = Annotated[uuid.UUID, Path(description="The dead letter's id")]
ADMIN = (*V1, 403)  # every admin call needs the admin token
_DL = "$response.body#/items/0/id"
DEAD_LETTER_LINKS = {
    "GetDeadLetter": link("GET", "/v1/admin/dead-letters/{dl_id}", "The first one", dl_id=_DL),
    "RetryDeadLetter": link(
        "POST", "/v1/admin/dead-letters/{dl_id}/retry", "Retry the first one", dl_id=_DL
    ),
    "DiscardDeadLetter": link(
        "POST", "/v1/admin/dead-letters/{dl_id}/discard", "Discard the first one", dl_id=_DL
    ),
}
DISCARD_BODY = Body(
    openapi_examples={
        "by-hand": {"summary": "Fixed by hand", "value": {"reason": "refunded by hand"}}
    }
)


def _answer(done: Done, response: Response) -> None:
    response.status_code = 200 if done is Done.ALREADY else 202


@router.get(
    "/dead-letters",
    response_model=Page[DeadLetterOut],
    summary="Dead letters, newest first",
    responses={
        **answer(
            200,
            "A page of dead letters, newest first",
            examples.page(examples.DEAD_LETTER),
            links=DEAD_LETTER_LINKS,
        ),
        **problems(*ADMIN, 422, rules=["bad-cursor"]),
    },
)
async def list_dead_letters(
    ctx: Ctx,
    _actor: Actor,
    status: Annotated[DeadLetterStatus | None, Query(description="Only these")] = None,
    definition: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only this definition's")
    ] = None,
    service: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only calls to this service")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[DeadLetterOut]:
    """Steps and compensations that exhausted their retries (or failed for good after the
    pivot, or as a non-critical step), waiting for an operator; filter by `status`
    (`open`, `retried`, `discarded`), `definition` or `service`."""
    before = decode_time_cursor(cursor)
    views = await ctx.ops.dead_letters(limit, status, definition, service, before)
    return Page[DeadLetterOut](
        items=[DeadLetterOut.of(v) for v in views], next_cursor=time_cursor_after(views, limit)
    )


@router.get(
    "/dead-letters/{dl_id}",
    response_model=DeadLetterOut,
    responses={
        **answer(200, "The dead letter", examples.DEAD_LETTER),
        **problems(*ADMIN, 404, 422, notes={404: "No dead letter with this id."}),
    },
    summary="One dead letter",
)
async def get_dead_letter(dl_id: DeadLetterId, ctx: Ctx, _actor: Actor) -> DeadLetterOut:
    """One dead letter: the saga, step and direction, the attempts, the last error and the
    request that was sent (secret header values masked)."""
    view = await ctx.ops.dead_letter(dl_id)
    return DeadLetterOut.of(view)


@router.post(
    "/dead-letters/{dl_id}/retry",
    response_model=DeadLetterOut,
    status_code=202,
    summary="Run the step or compensation again with fresh attempts and the same key",
    responses={
        **answer(202, "Retrying", {**examples.DEAD_LETTER, "status": "retried"}),
        **answer(
            200,
            "Already retried: nothing changed",
            {**examples.DEAD_LETTER, "status": "retried"},
            model=DeadLetterOut,
        ),
        **problems(
            *ADMIN,
            404,
            409,
            415,
            422,
            notes={
                404: "No dead letter with this id.",
                409: "The dead letter was discarded, or its saga cannot take it up again.",
            },
        ),
    },
)
async def retry_dead_letter(
    dl_id: DeadLetterId, ctx: Ctx, actor: Actor, response: Response
) -> DeadLetterOut:
    """Run the step or compensation again with fresh attempts and the same
    Idempotency-Key; a `failed` saga resumes compensating. Recorded in the audit log."""
    _answer(await ctx.ops.retry_dead_letter(dl_id, actor), response)
    return await get_dead_letter(dl_id, ctx, actor)


@router.post(
    "/dead-letters/{dl_id}/discard",
    response_model=DeadLetterOut,
    status_code=202,
    summary="Close a dead letter without running it, with a reason",
    responses={
        **answer(
            202,
            "Discarded",
            {**examples.DEAD_LETTER, "status": "discarded", "reason": "refunded by hand"},
        ),
        **answer(
            200,
            "Already discarded: nothing changed",
            {**examples.DEAD_LETTER, "status": "discarded", "reason": "refunded by hand"},
            model=DeadLetterOut,
        ),
        **problems(
            *ADMIN,
            404,
            409,
            415,
            422,
            notes={404: "No dead letter with this id.", 409: "The dead letter was retried."},
        ),
    },
)
async def discard_dead_letter(
    dl_id: DeadLetterId,
    body: Annotated[DiscardRequest, DISCARD_BODY],
    ctx: Ctx,
    actor: Actor,
    response: Response,
) -> DeadLetterOut:
    """Close a dead letter without running it, with the operator's `reason` (for example,
    the effect was undone by hand). Recorded in the audit log."""
    _answer(await ctx.ops.discard_dead_letter(dl_id, actor, body.reason), response)
    return await get_dead_letter(dl_id, ctx, actor)


@router.post(
    "/services/{name}/circuit/reset",
    response_model=ServiceOut,
    summary="Close a service's circuit now",
    responses={
        **answer(200, "The service, its circuit closed", examples.SERVICE_OUT),
        **problems(*ADMIN, 404, 415, 422, notes={404: "No service with this name."}),
    },
)
async def reset_circuit(name: NamePath, ctx: Ctx, actor: Actor) -> ServiceOut:
    """Close the service's circuit breaker and clear its failure count, for every executor
    at once. Recorded in the audit log."""
    return ServiceOut.of(await ctx.ops.reset_circuit(name, actor))


@router.get(
    "/audit",
    response_model=Page[AuditOut],
    summary="Admin actions, newest first",
    responses={
        **answer(200, "A page of admin actions, newest first", examples.page(examples.AUDIT)),
        **problems(*ADMIN, 422, rules=["bad-cursor"]),
    },
)
async def audit_log(
    ctx: Ctx, _actor: Actor, limit: Limit = 50, cursor: Cursor = None
) -> Page[AuditOut]:
    """Who (token id) did what (retry, discard, circuit reset) to which target, and when."""
    before = decode_cursor(cursor)
    if before is not None and not valid_offset(before):
        raise bad_cursor()
    rows = await ctx.ops.audit_log(limit, before)
    next_cursor = encode_cursor(rows[-1]["id"]) if len(rows) == limit else None
    return Page[AuditOut](items=[AuditOut.model_validate(r) for r in rows], next_cursor=next_cursor)
