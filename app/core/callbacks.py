"""Callback steps: the report a participant sends, and what it means for the attempt.

A callback step's participant may answer `202` and report later to
`POST /v1/callbacks/{token}`. The token is a capability bound to one attempt: only its
SHA-256 is stored, so a leaked table reveals no usable token. What a report (or its
absence) means is a `CallResult`, so that `decide` judges it like any other answer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.core.definition import Document
from app.core.outcome import CallFailure, CallResult

ACCEPTED = 202  # the status with which a callback step's participant accepts a call
CALLBACK_URL_HEADER = "X-Saga-Callback-URL"
TOKEN_BYTES = 32  # 256 random bits (the contract asks for at least 128)
MAX_ERROR_LENGTH = 4096


class SucceededReport(Document):
    """The call's work is done: the step completes with `response`."""

    status: Literal["succeeded"]
    response: Any = Field(default=None, description="The step's response (any JSON).")


class FailedReport(Document):
    """The call's work failed for good: a final failure of kind `callback_failed`."""

    status: Literal["failed"]
    error: str = Field(min_length=1, max_length=4096, examples=["card declined"])


class CallbackReport(Document):
    """`POST /v1/callbacks/{token}` body: the outcome of the accepted call.

    One model validates both shapes; the document shows them as `oneOf`.
    """

    status: Literal["succeeded", "failed"] = Field(
        description="`succeeded`: the step completes with `response`; `failed`: a final "
        "failure of kind `callback_failed` (the saga compensates, this step included)."
    )
    response: Any = Field(
        default=None, description="With `succeeded`: the step's response (any JSON)."
    )
    error: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_ERROR_LENGTH,
        description="With `failed`: what went wrong, in words.",
        examples=["card declined"],
    )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        shapes = [handler(m.__pydantic_core_schema__) for m in (SucceededReport, FailedReport)]
        return {"title": "CallbackReport", "description": cls.__doc__, "oneOf": shapes}

    @model_validator(mode="after")
    def _shape(self) -> CallbackReport:
        if self.status == "failed" and self.error is None:
            raise ValueError("a failed report needs an error: say what went wrong")
        if self.status == "succeeded" and self.error is not None:
            raise ValueError("a succeeded report carries a response, not an error")
        if self.status == "failed" and self.response is not None:
            raise ValueError("a failed report carries an error, not a response")
        return self

    def stored(self) -> dict[str, Any]:
        """The report as kept: what a repeat is compared with."""
        if self.status == "succeeded":
            return {"status": "succeeded", "response": self.response}
        return {"status": "failed", "error": self.error}


def token_hash(token: str) -> str:
    """What is stored of a token (and looked up by)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def reported(report: dict[str, Any]) -> CallResult:
    """The attempt's result from a stored report: a success with the reported response
    (under the `202` that accepted the call), or a final failure."""
    if report.get("status") == "succeeded":
        return CallResult(status_code=ACCEPTED, body=report.get("response"))
    return CallResult(
        failure=CallFailure.REPORTED_FAILURE,
        message=f"the participant reported failure: {report.get('error') or 'no reason given'}",
    )


def no_report(timeout_seconds: float) -> CallResult:
    """The attempt's result when no report came in time: a timeout, outcome unknown."""
    return CallResult(
        failure=CallFailure.TIMEOUT,
        message=f"no callback report within {timeout_seconds:g} s; outcome unknown",
    )
