"""One function decides what a call's result means: success, retry, or final failure.

Whether the action may have happened at the participant ("outcome unknown") is
decided here too, because it decides whether the step is compensated on unwind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum

from app.core.states import ErrorKind


class CallFailure(StrEnum):
    """How a call failed before an HTTP status came back."""

    CONNECT = "connect"  # nothing was sent: the action did not happen
    TIMEOUT = "timeout"  # sent, no answer in time: may have happened
    CONNECTION_LOST = "connection_lost"  # sent, connection broke: may have happened
    TEMPLATE = "template"  # the request could not be built: nothing was sent
    TOO_LARGE = "too_large"  # a 2xx answer whose body is over the cap: done, but unusable
    BLOCKED = "blocked"  # the host or an address it resolves to is not allowed: not sent
    REPORTED_FAILURE = "reported_failure"  # a callback step's participant reported failure


@dataclass(frozen=True, slots=True)
class CallResult:
    """What the participant client observed for one attempt."""

    status_code: int | None = None
    body: object = None
    retry_after: float | None = None
    failure: CallFailure | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classified result of one attempt."""

    success: bool
    retryable: bool
    maybe_applied: bool  # the participant may have applied the action
    error_kind: ErrorKind | None
    message: str


def classify(result: CallResult, retry_on_status: list[int] | tuple[int, ...]) -> Outcome:
    """Success on 2xx; retry on connection errors, timeouts and `retry_on_status`; else final."""
    if result.failure is CallFailure.TEMPLATE:
        return Outcome(False, False, False, ErrorKind.TEMPLATE, result.message)
    if result.failure is CallFailure.BLOCKED:
        return Outcome(False, False, False, ErrorKind.BLOCKED, result.message)
    if result.failure is CallFailure.CONNECT:
        return Outcome(False, True, False, ErrorKind.CONNECTION, result.message)
    if result.failure is CallFailure.CONNECTION_LOST:
        return Outcome(False, True, True, ErrorKind.CONNECTION, result.message)
    if result.failure is CallFailure.TIMEOUT:
        return Outcome(False, True, True, ErrorKind.TIMEOUT, result.message)
    if result.failure is CallFailure.REPORTED_FAILURE:
        # The participant said it failed, for good; it may have done part of it, so the
        # step is compensated on unwind.
        return Outcome(False, False, True, ErrorKind.CALLBACK_FAILED, result.message)
    if result.failure is CallFailure.TOO_LARGE:
        # The participant did it; asking again would bring the same body. Final, and
        # compensated on unwind like any applied action.
        return Outcome(False, False, True, ErrorKind.RESPONSE_TOO_LARGE, result.message)
    status = result.status_code
    assert status is not None, "a CallResult has a status code or a failure"
    if 200 <= status < 300:
        return Outcome(True, False, True, None, "")
    message = result.message or f"participant answered {status}"
    return Outcome(
        success=False,
        retryable=status in retry_on_status,
        maybe_applied=status >= 500,
        error_kind=ErrorKind.HTTP_STATUS,
        message=message,
    )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
