"""Participants report a callback step's outcome: `POST /v1/callbacks/{token}`.

No bearer token: the path's token (256 random bits, bound to one attempt of one step)
is the credential, so a participant needs no API token to report.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path

from app.api.context import Ctx
from app.api.openapi import answer, problems
from app.api.schemas import CallbackAnswer
from app.core.callbacks import CallbackReport
from app.usecases.callbacks import MAX_TOKEN_LENGTH

router = APIRouter(prefix="/v1/callbacks")
Token = Annotated[
    str,
    Path(
        description="The token of the `X-Saga-Callback-URL` the attempt carried",
        min_length=1,
        max_length=MAX_TOKEN_LENGTH,
        pattern=r"^[A-Za-z0-9_-]+$",
    ),
]
REPORT_BODY = Body(
    openapi_examples={
        "succeeded": {
            "summary": "The payment was captured",
            "value": {"status": "succeeded", "response": {"charge_id": "ch_1"}},
        },
        "failed": {
            "summary": "The card was declined",
            "value": {"status": "failed", "error": "card declined"},
        },
    }
)
EXAMPLE = {
    "saga_id": "7b2c1d5e-4f3a-4b8e-9c1d-2e3f4a5b6c7d",
    "step": "charge",
    "status": "succeeded",
}


@router.post(
    "/{token}",
    response_model=CallbackAnswer,
    summary="Report a callback step's outcome",
    responses={
        **answer(200, "Taken (or the very same report again: idempotent)", EXAMPLE),
        **problems(
            400,
            404,
            409,
            413,
            415,
            422,
            503,
            notes={
                404: "No callback attempt has this token.",
                409: "A different report was taken for this attempt, or its wait is over "
                "(timed out: a retry carries a new token; or the saga moved on).",
            },
        ),
    },
)
async def report_callback(
    token: Token, ctx: Ctx, report: Annotated[CallbackReport, REPORT_BODY]
) -> CallbackAnswer:
    """Report the outcome of a callback step's attempt, to the URL its call carried in
    `X-Saga-Callback-URL`. The first report is taken; the same report again answers 200
    (resend it after a lost answer); a different one, or any report once the attempt's
    wait is over (its timeout passed: the retry carries a new URL; or the saga was
    cancelled or passed its deadline), answers 409. A report may come before the
    participant's own `202` answer."""
    taken = await ctx.callbacks.report(token, report)
    assert taken.saga_id is not None and taken.step is not None
    return CallbackAnswer(saga_id=taken.saga_id, step=taken.step, status=report.status)
