"""Classifying one attempt's result, and reading Retry-After (contract section 6)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from app.core.definition import DEFAULT_RETRY_ON_STATUS
from app.core.outcome import CallFailure, CallResult, Outcome, classify, parse_retry_after
from app.core.states import ErrorKind

DEFAULT = list(DEFAULT_RETRY_ON_STATUS)
HTTP = ErrorKind.HTTP_STATUS


@pytest.mark.parametrize("status", [200, 201, 202, 204, 206, 299])
def test_2xx_is_success(status: int) -> None:
    result = CallResult(status_code=status, body={"id": 1})
    assert classify(result, DEFAULT) == Outcome(True, False, True, None, "")


def test_success_even_if_listed_for_retry() -> None:
    # retry_on_status cannot hold a 2xx, but classify must still never retry a success.
    assert classify(CallResult(status_code=200), [200]).success is True


@pytest.mark.parametrize("status", [408, 425, 429])
def test_retryable_4xx_did_not_apply(status: int) -> None:
    result = CallResult(status_code=status, message=f"participant answered {status}: busy")
    assert classify(result, DEFAULT) == Outcome(
        False, True, False, HTTP, f"participant answered {status}: busy"
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_retryable_5xx_may_have_applied(status: int) -> None:
    assert classify(CallResult(status_code=status), DEFAULT) == Outcome(
        False, True, True, HTTP, f"participant answered {status}"
    )


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 412, 413, 422, 451, 499])
def test_other_4xx_is_final_and_not_applied(status: int) -> None:
    assert classify(CallResult(status_code=status), DEFAULT) == Outcome(
        False, False, False, HTTP, f"participant answered {status}"
    )


@pytest.mark.parametrize("status", [501, 505, 507, 511, 599])
def test_5xx_not_listed_is_final_but_may_have_applied(status: int) -> None:
    assert classify(CallResult(status_code=status), DEFAULT) == Outcome(
        False, False, True, HTTP, f"participant answered {status}"
    )


@pytest.mark.parametrize("status", [100, 199, 301, 302, 304, 307, 308])
def test_non_2xx_non_error_statuses_are_final(status: int) -> None:
    outcome = classify(CallResult(status_code=status), DEFAULT)
    assert outcome == Outcome(False, False, False, HTTP, f"participant answered {status}")


def test_custom_retry_on_status() -> None:
    custom = [409]
    assert classify(CallResult(status_code=409), custom) == Outcome(
        False, True, False, HTTP, "participant answered 409"
    )
    assert classify(CallResult(status_code=503), custom) == Outcome(
        False, False, True, HTTP, "participant answered 503"
    )
    assert classify(CallResult(status_code=429), custom).retryable is False


def test_empty_retry_on_status_never_retries_a_status() -> None:
    for status in (408, 429, 500, 503):
        assert classify(CallResult(status_code=status), []).retryable is False


def test_retry_on_status_as_tuple() -> None:
    assert classify(CallResult(status_code=503), DEFAULT_RETRY_ON_STATUS).retryable is True


def test_message_from_the_result_is_kept() -> None:
    result = CallResult(status_code=404, message='participant answered 404: {"error":"no"}')
    assert classify(result, DEFAULT).message == 'participant answered 404: {"error":"no"}'


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (CallFailure.TIMEOUT, Outcome(False, True, True, ErrorKind.TIMEOUT, "m")),
        (CallFailure.CONNECT, Outcome(False, True, False, ErrorKind.CONNECTION, "m")),
        (CallFailure.CONNECTION_LOST, Outcome(False, True, True, ErrorKind.CONNECTION, "m")),
        (CallFailure.TEMPLATE, Outcome(False, False, False, ErrorKind.TEMPLATE, "m")),
    ],
)
def test_call_failures(failure: CallFailure, expected: Outcome) -> None:
    assert classify(CallResult(failure=failure, message="m"), DEFAULT) == expected


def test_failures_ignore_retry_on_status() -> None:
    # A timeout is retried even when the policy lists no statuses at all.
    assert classify(CallResult(failure=CallFailure.TIMEOUT), []).retryable is True
    assert classify(CallResult(failure=CallFailure.TEMPLATE), DEFAULT).retryable is False


# --- Retry-After ----------------------------------------------------------------------------

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        ("  30 ", 30.0),
        ("007", 7.0),
        ("86400", 86400.0),
    ],
)
def test_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 08:28:00 GMT", 3600.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: retry now, not negative
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 09:28:10 +0200", 10.0),  # numeric offset
        ("Wed, 21 Oct 2015 07:28:05 -0000", 5.0),  # unknown zone read as UTC
        ("21 Oct 2015 07:29:00 GMT", 60.0),  # no weekday
    ],
)
def test_http_date(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(expected)


def test_http_date_without_now_uses_the_clock() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    seconds = parse_retry_after(format_datetime(later, usegmt=True))
    assert seconds is not None
    assert 3590 <= seconds <= 3600


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "1.5",
        "-5",
        "+5",
        "5s",
        "0x10",
        "1e3",
        "Wed, 99 Foo 2015 07:28:00 GMT",
        "Wed, 21 Oct 2015",
        "²",  # str.isdigit() is true for superscripts, float() refuses them
    ],
)
def test_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None
