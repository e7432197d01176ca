"""Sagas: start (idempotently), read with long-poll, list, history, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Response

from app.api import examples
from app.api.auth import require_api
from app.api.context import Ctx
from app.api.openapi import IDEMPOTENT_REPLAYED, LOCATION, V1, answer, problems, saga_links
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
from app.api.schemas import EventOut, Page, SagaOut, SagaStart, SagaSummaryOut
from app.core.definition import NAME_PATTERN
from app.core.labels import LABEL_FILTER_PATTERN, PRINTABLE_PATTERN
from app.core.states import SagaStatus
from app.core.views import SagaDocument, StartResult
from app.logs import request_id_var
from app.usecases.sagas import MAX_WAIT_SECONDS, StartRequest

router = APIRouter(prefix="/v1/sagas", dependencies=[Depends(require_api)])
# What the start accepts as a key, minus the edge spaces HTTP strips from a header value.
_KEY_SCHEMA = {"pattern": r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$", "maxLength": 255}
SagaId = Annotated[uuid.UUID, Path(description="The saga's id")]
SAGA_START_BODY = Body(
    openapi_examples={
        "checkout": {"summary": "Start a checkout", "value": examples.SAGA_START},
        "pinned": {
            "summary": "On version 1 of the definition",
            "value": {**examples.SAGA_START, "version": 1},
        },
    }
)


def _document(
    saga: SagaDocument, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """The saga's view as the store rendered it (the `SagaOut` document)."""
    return Response(saga.body, status_code=status, headers=headers, media_type="application/json")


@router.post(
    "",
    response_model=SagaOut,
    status_code=201,
    summary="Start a saga",
    responses={
        **answer(
            201,
            "Started",
            {**examples.SAGA_OUT, "status": "running"},
            headers={"Location": LOCATION},
            links=saga_links(),
        ),
        **answer(
            200,
            "Replay: this Idempotency-Key started this saga with the same definition and input",
            examples.SAGA_OUT,
            model=SagaOut,
            headers={"Location": LOCATION, "Idempotent-Replayed": IDEMPOTENT_REPLAYED},
            links=saga_links(),
        ),
        **problems(
            *V1,
            409,
            415,
            422,
            notes={
                409: "The definition is exclusive and another saga of it with this "
                "business_key is not finished yet; `Location` names that saga.",
                422: "Invalid fields, a bad Idempotency-Key, an unknown definition or version, "
                "no business_key on an exclusive definition, or an Idempotency-Key used "
                "before with another definition, input, business_key or labels.",
                503: "The database is unavailable, or (with `fail_fast`) the first service's "
                "circuit is open; retry after `Retry-After` seconds.",
            },
            rules=[
                "unknown-definition",
                "idempotency-key-reused",
                "invalid-notify",
                "host-not-allowed",
            ],
        ),
    },
)
async def start_saga(
    body: Annotated[SagaStart, SAGA_START_BODY],
    ctx: Ctx,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1-255 printable ASCII characters: one saga per key, whatever the "
            "number of requests.",
            json_schema_extra=_KEY_SCHEMA,
            examples=["order-1001"],
        ),
    ] = None,
    traceparent: Annotated[
        str | None, Header(description="W3C trace context; ignored when malformed.")
    ] = None,
    fail_fast: Annotated[
        bool, Query(description="503 instead of waiting when the first service's circuit is open")
    ] = False,
) -> Response:
    """Start a saga on the latest (or the given) `version` of a definition with `input`.

    With `Idempotency-Key`, the first request creates the saga (`201`) and every later one
    with the same definition and input answers `200` with the saga as it is now and
    `Idempotent-Replayed: true`; the same key with anything else is `422`. Any number of
    concurrent requests with one key create exactly one saga.
    """
    result, saga = await ctx.sagas.start(
        StartRequest(
            definition=body.definition,
            version=body.version,
            input=body.input,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            request_id=request_id_var.get(),
            fail_fast=fail_fast,
            business_key=body.business_key,
            labels=body.labels,
            notify=body.notify,
        )
    )
    headers = {"Location": f"/v1/sagas/{saga.id}"}
    if result is StartResult.CREATED:
        ctx.metrics.sagas_started.labels(saga.definition).inc()
    else:
        headers["Idempotent-Replayed"] = "true"
    return _document(saga, 201 if result is StartResult.CREATED else 200, headers)


@router.get(
    "",
    response_model=Page[SagaSummaryOut],
    summary="List sagas, newest first",
    responses={
        **answer(200, "A page of sagas, newest first", examples.page(examples.SAGA_SUMMARY)),
        **problems(*V1, 422, rules=["bad-cursor"]),
    },
)
async def list_sagas(
    ctx: Ctx,
    status: Annotated[SagaStatus | None, Query(description="Only sagas in this status")] = None,
    definition: Annotated[
        str | None, Query(pattern=NAME_PATTERN, description="Only sagas of this definition")
    ] = None,
    business_key: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=255,
            json_schema_extra={"pattern": PRINTABLE_PATTERN},  # checked by the use case
            description="Only sagas with this business key",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        Query(
            max_length=16,
            json_schema_extra={"items": {"type": "string", "pattern": LABEL_FILTER_PATTERN}},
            description="`key:value`; repeat it for more labels: only sagas that have all",
        ),
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Page[SagaSummaryOut]:
    """Sagas, newest first, optionally only those with a `status`, of a `definition`, with a
    `business_key` and with every `label` (`key:value`, repeatable); filters combine.

    Items leave out the saga's `input` and its steps' `response` (they can be large);
    `GET /v1/sagas/{id}` has them."""
    views = await ctx.sagas.page(
        limit, status, definition, decode_time_cursor(cursor), business_key, label
    )
    return Page[SagaSummaryOut](
        items=[SagaSummaryOut.of(v) for v in views], next_cursor=time_cursor_after(views, limit)
    )


@router.get(
    "/{saga_id}",
    response_model=SagaOut,
    summary="One saga",
    responses={
        **answer(200, "The saga with its steps", examples.SAGA_OUT),
        **problems(*V1, 404, 422, notes={404: "No saga with this id."}),
    },
)
async def get_saga(
    saga_id: SagaId,
    ctx: Ctx,
    wait_seconds: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Long-poll until terminal")
    ] = 0,
) -> Response:
    """The saga, its status, error and every step's status, attempts and response.

    With `wait_seconds` (at most 30) the answer comes as soon as the saga is terminal
    (`completed`, `compensated` or `failed`) or when the time is up.
    """
    return _document(await ctx.sagas.wait(saga_id, wait_seconds))


@router.get(
    "/{saga_id}/events",
    response_model=Page[EventOut],
    summary="Append-only history",
    responses={
        **answer(200, "A page of events, oldest first", examples.page(examples.EVENT)),
        **problems(*V1, 404, 422, notes={404: "No saga with this id."}, rules=["bad-cursor"]),
    },
)
async def saga_events(
    saga_id: SagaId, ctx: Ctx, limit: Limit = 500, cursor: Cursor = None
) -> Page[EventOut]:
    """The saga's history, oldest first: its start, every attempt of every action and
    compensation (time, duration, outcome, status code or error) and its end."""
    after = decode_cursor(cursor)
    if after is not None and not valid_offset(after):
        raise bad_cursor()
    rows = await ctx.sagas.events(saga_id, limit, after)
    next_cursor = encode_cursor(rows[-1]["id"]) if len(rows) == limit else None
    return Page[EventOut](
        items=[EventOut.model_validate(r) for r in rows],
        next_cursor=next_cursor,
    )


@router.post(
    "/{saga_id}/cancel",
    response_model=SagaOut,
    status_code=202,
    summary="Stop forward progress and compensate",
    responses={
        **answer(
            202,
            "Cancellation requested: the saga compensates",
            {**examples.SAGA_OUT, "cancel_requested": True},
        ),
        **problems(
            *V1,
            404,
            409,
            415,
            422,
            notes={
                404: "No saga with this id.",
                409: "The saga is already terminal, or its pivot step is in flight or has "
                "succeeded.",
            },
        ),
    },
)
async def cancel_saga(saga_id: SagaId, ctx: Ctx) -> Response:
    """Ask the saga to stop going forward and compensate its completed steps (error kind
    `cancelled`). `409` when it is already terminal or has passed its pivot step."""
    return _document(await ctx.sagas.cancel(saga_id), 202)
