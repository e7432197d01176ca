"""The dashboard's pure helpers (timeline, chart, why a saga waits, what would be
compensated) and its session and CSRF tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from app.core.commit import SagaState, StepState, Waiting
from app.core.definition import DefinitionSpec
from app.core.states import SagaStatus, StepStatus, WaitReason
from app.dashboard import auth
from app.dashboard.views import (
    Bar,
    chart_bars,
    compensations_if_failed,
    fill_buckets,
    timeline,
    why_waiting,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
S = SagaStatus
St = StepStatus


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def started(step: str, direction: str, attempt: int, seconds: float) -> dict[str, Any]:
    return {
        "type": "attempt_started",
        "step": step,
        "direction": direction,
        "attempt": attempt,
        "at": at(seconds),
        "outcome": "started",
        "status_code": None,
        "message": None,
    }


def finished(
    step: str,
    direction: str,
    attempt: int,
    seconds: float,
    outcome: str = "succeeded",
    status_code: int | None = 200,
    message: str | None = None,
) -> dict[str, Any]:
    return {
        "type": "attempt_finished",
        "step": step,
        "direction": direction,
        "attempt": attempt,
        "at": at(seconds),
        "outcome": outcome,
        "status_code": status_code,
        "message": message,
    }


def other(kind: str, seconds: float, step: str | None = None) -> dict[str, Any]:
    return {"type": kind, "step": step, "direction": None, "attempt": None, "at": at(seconds)}


# --- timeline ---------------------------------------------------------------------------


def test_timeline_pairs_each_finished_attempt_with_its_start() -> None:
    events = [
        other("saga_started", 0),
        started("a", "action", 1, 0.5),
        finished("a", "action", 1, 1.5),
        started("b", "action", 1, 2),
        finished("b", "action", 1, 2.25, "retryable", 503, "participant answered 503"),
        started("b", "action", 2, 3),
        finished("b", "action", 2, 3.5, "failed", 400, "participant answered 400: declined"),
        other("compensation_started", 3.5, "b"),
        started("a", "compensation", 1, 4),
        finished("a", "compensation", 1, 4.75),
        other("saga_compensated", 5),
    ]
    bars = timeline(events, T0, at(10))
    assert bars == [
        Bar("a", "action", 1, "succeeded", 0.5, 1.5, "a action #1: succeeded (200)"),
        Bar(
            "b",
            "action",
            1,
            "retryable",
            2.0,
            2.25,
            "b action #1: retryable (503) - participant answered 503",
        ),
        Bar(
            "b",
            "action",
            2,
            "failed",
            3.0,
            3.5,
            "b action #2: failed (400) - participant answered 400: declined",
        ),
        Bar("a", "compensation", 1, "succeeded", 4.0, 4.75, "a compensation #1: succeeded (200)"),
    ]


def test_timeline_draws_an_unfinished_attempt_as_in_flight_up_to_now() -> None:
    events = [
        started("a", "action", 1, 1),
        finished("a", "action", 1, 2),
        started("b", "action", 1, 3),
    ]
    bars = timeline(events, T0, at(7.5))
    assert len(bars) == 2
    last = bars[-1]
    assert (last.step, last.direction, last.attempt) == ("b", "action", 1)
    assert last.outcome == "in_flight"
    assert (last.start, last.end) == (3.0, 7.5)
    assert "in flight" in last.label


def test_timeline_keeps_attempts_of_the_same_step_and_directions_apart() -> None:
    # A compensation starts while the action's attempt of the same number is unfinished.
    events = [
        started("a", "action", 1, 1),
        started("a", "compensation", 1, 2),
        finished("a", "compensation", 1, 3),
    ]
    bars = timeline(events, T0, at(4))
    assert [(b.direction, b.outcome, b.start, b.end) for b in bars] == [
        ("compensation", "succeeded", 2.0, 3.0),
        ("action", "in_flight", 1.0, 4.0),
    ]


def test_timeline_finished_without_start_is_a_zero_length_bar() -> None:
    bars = timeline([finished("a", "action", 1, 2, "failed", None, "cannot connect")], T0, at(3))
    assert len(bars) == 1
    assert (bars[0].start, bars[0].end) == (2.0, 2.0)
    # No status code: none in the label; the message is there.
    assert bars[0].label == "a action #1: failed - cannot connect"


def test_timeline_draws_a_callback_steps_wait_after_its_202() -> None:
    events = [
        started("charge", "action", 1, 1),
        finished("charge", "action", 1, 1.5, "accepted", 202),
        other("callback_reported", 4, "charge"),
        finished("charge", "action", 1, 4.2, "succeeded", 202),
        started("charge", "action", 2, 5),
        finished("charge", "action", 2, 5.5, "accepted", 202),
    ]
    accepted, waited, accepted_again, waiting_now = timeline(events, T0, at(8))
    assert (accepted.outcome, accepted.start, accepted.end, accepted.wait) == (
        "accepted",
        1,
        1.5,
        False,
    )
    assert "(202)" in accepted.label
    assert (waited.outcome, waited.start, waited.end, waited.wait) == ("succeeded", 1.5, 4.2, True)
    assert "waited for its callback, then succeeded" in waited.label
    assert accepted_again.attempt == 2 and not accepted_again.wait
    assert (waiting_now.outcome, waiting_now.attempt, waiting_now.start, waiting_now.end) == (
        "waiting",
        2,
        5.5,
        8,
    )
    assert waiting_now.wait and "waiting for its callback report" in waiting_now.label


def test_timeline_of_no_attempts_is_empty() -> None:
    assert timeline([other("saga_started", 0)], T0, at(1)) == []


# --- throughput buckets and chart -------------------------------------------------------


def test_fill_buckets_gives_twelve_five_minute_buckets_oldest_first() -> None:
    now = datetime(2025, 3, 1, 12, 7, 30, tzinfo=UTC)
    existing = [
        {"at": datetime(2025, 3, 1, 11, 30, tzinfo=UTC), "finished": 3, "failed": 1},
        {"at": datetime(2025, 3, 1, 12, 5, tzinfo=UTC), "finished": 2, "failed": 0},
    ]
    out = fill_buckets(existing, now)
    assert len(out) == 12
    starts = [b["at"] for b in out]
    assert starts[0] == datetime(2025, 3, 1, 11, 10, tzinfo=UTC)
    assert starts[-1] == datetime(2025, 3, 1, 12, 5, tzinfo=UTC)
    assert all(b - a == timedelta(minutes=5) for a, b in pairwise(starts))
    by_start = {b["at"]: (b["finished"], b["failed"]) for b in out}
    assert by_start[datetime(2025, 3, 1, 11, 30, tzinfo=UTC)] == (3, 1)
    assert by_start[datetime(2025, 3, 1, 12, 5, tzinfo=UTC)] == (2, 0)
    zeros = [v for k, v in by_start.items() if k.minute not in (30, 5)]
    assert len(zeros) == 10
    assert all(v == (0, 0) for v in zeros)


def test_fill_buckets_ignores_buckets_outside_the_window_and_keeps_the_timezone() -> None:
    tz = datetime(2025, 1, 1, tzinfo=UTC).astimezone().tzinfo  # whatever the local zone is
    now = datetime(2025, 3, 1, 12, 5, 0, tzinfo=UTC).astimezone(tz)
    existing = [
        {"at": datetime(2025, 3, 1, 10, 0, tzinfo=UTC), "finished": 9, "failed": 9},
        {"at": datetime(2025, 3, 1, 12, 5, tzinfo=UTC), "finished": 1, "failed": 1},
    ]
    out = fill_buckets(existing, now)
    assert len(out) == 12
    assert sum(b["finished"] for b in out) == 1
    # A time exactly on a boundary is the start of the last bucket.
    assert out[-1]["at"] == now
    assert all(b["at"].tzinfo == now.tzinfo for b in out)


def test_fill_buckets_of_nothing_is_all_zeros() -> None:
    out = fill_buckets([], T0)
    assert len(out) == 12
    assert all(b["finished"] == 0 and b["failed"] == 0 for b in out)


def test_chart_bars_geometry() -> None:
    buckets = [
        {"at": datetime(2025, 3, 1, 12, 0, tzinfo=UTC), "finished": 4, "failed": 1},
        {"at": datetime(2025, 3, 1, 12, 5, tzinfo=UTC), "finished": 0, "failed": 0},
        {"at": datetime(2025, 3, 1, 12, 10, tzinfo=UTC), "finished": 2, "failed": 2},
    ]
    chart = chart_bars(buckets, width=600, height=120)
    assert (chart["max"], chart["width"], chart["height"]) == (4, 600, 120)
    b0, b1, b2 = chart["bars"]
    # Slot 200 wide, 2px gap each side; the tallest bar is height - 10 = 110.
    assert (b0["x"], b0["w"]) == (2.0, 196.0)
    assert (b0["total_y"], b0["total_h"]) == (10.0, 110.0)
    assert (b0["failed_y"], b0["failed_h"]) == (92.5, 27.5)
    assert b0["label"] == "12:00: 4 finished, 1 not completed"
    assert b0["tick"] == "12:00"
    assert (b1["x"], b1["total_y"], b1["total_h"], b1["failed_h"]) == (202.0, 120.0, 0.0, 0.0)
    assert (b2["x"], b2["total_y"], b2["total_h"]) == (402.0, 65.0, 55.0)
    assert (b2["failed_y"], b2["failed_h"]) == (65.0, 55.0)
    for b in chart["bars"]:
        assert b["x"] + b["w"] <= 600
        assert b["total_y"] + b["total_h"] == pytest.approx(120)
        assert b["failed_h"] <= b["total_h"]


def test_chart_bars_of_an_idle_hour_has_no_division_by_zero() -> None:
    buckets = fill_buckets([], T0)
    chart = chart_bars(buckets)
    assert chart["max"] == 1
    assert len(chart["bars"]) == 12
    assert all(b["total_h"] == 0 and b["failed_h"] == 0 for b in chart["bars"])
    assert chart_bars([])["bars"] == []


# --- why a saga waits -------------------------------------------------------------------


def waiting(
    status: SagaStatus = S.RUNNING,
    due_at: datetime | None = None,
    waiting_on: str | None = None,
    lease_owner: str | None = None,
    lease_expires_at: datetime | None = None,
    last_error: dict[str, Any] | None = None,
) -> str | None:
    on = None
    if waiting_on:
        reason, _, service = waiting_on.partition(":")
        on = Waiting(WaitReason(reason), service)
    return why_waiting(status, due_at, on, lease_owner, lease_expires_at, T0, last_error)


@pytest.mark.parametrize("status", [S.COMPLETED, S.COMPENSATED, S.FAILED])
def test_why_waiting_is_none_for_a_terminal_saga(status: SagaStatus) -> None:
    assert waiting(status, due_at=at(-5), waiting_on="circuit_open:pay") is None
    assert waiting(status, lease_owner="w1", lease_expires_at=at(3)) is None


def test_why_waiting_lease_held() -> None:
    text = waiting(due_at=at(-1), lease_owner="host:42:abc", lease_expires_at=at(3))
    assert text == "in progress: lease held by worker host:42:abc until 12:00:03"


def test_why_waiting_expired_lease_is_not_in_progress() -> None:
    text = waiting(due_at=at(-1), lease_owner="host:42:abc", lease_expires_at=at(-2))
    assert text == "due now: waiting for a free executor"


def test_why_waiting_circuit_open() -> None:
    text = waiting(due_at=at(30), waiting_on="circuit_open:payments")
    assert text == "circuit of service 'payments' is open; next look at 12:00:30"


def test_why_waiting_half_open_probe() -> None:
    text = waiting(due_at=at(2), waiting_on="half_open_probe_in_flight:payments")
    assert text == "waiting for the half-open probe to 'payments'; next look at 12:00:02"


def test_why_waiting_bulkhead_full() -> None:
    assert waiting(due_at=at(1), waiting_on="bulkhead_full:orders") == (
        "bulkhead of service 'orders' is full; next look at 12:00:01"
    )
    assert waiting(waiting_on="bulkhead_full:orders") == "bulkhead of service 'orders' is full"


def test_why_waiting_retry_due() -> None:
    error = {"kind": "http_status", "message": "participant answered 503"}
    assert waiting(due_at=at(5), last_error=error) == (
        "retry due at 12:00:05 after http_status: participant answered 503"
    )
    assert waiting(due_at=at(5)) == "retry due at 12:00:05"
    # A compensating saga waits for its compensation's retry the same way.
    assert waiting(S.COMPENSATING, due_at=at(5)) == "retry due at 12:00:05"


def test_why_waiting_due_now() -> None:
    assert waiting(due_at=T0) == "due now: waiting for a free executor"
    assert waiting(due_at=at(-60)) == "due now: waiting for a free executor"


def test_why_waiting_for_a_callback_says_until_when() -> None:
    # The saga's own due time is the wait's end too; it is no retry.
    text = why_waiting(S.RUNNING, at(600), None, None, None, T0, None, ("charge", at(600)))
    assert text == (
        "step 'charge' is waiting for its callback until 12:10:00 "
        "(its participant answered 202; no report yet)"
    )
    # A report was taken and an executor holds the saga: it is in progress.
    held = why_waiting(S.RUNNING, at(600), None, "w1", at(3), T0, None, ("charge", at(600)))
    assert held is not None and held.startswith("in progress")


def test_why_waiting_nothing_scheduled() -> None:
    assert waiting() is None


# --- what would be compensated ----------------------------------------------------------


def step(name: str, *, comp: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "action": {"service": "svc", "path": f"/{name}"}}
    if comp:
        doc["compensation"] = {"service": "svc", "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


def spec(*steps: dict[str, Any]) -> DefinitionSpec:
    return DefinitionSpec.model_validate({"name": "flow", "steps": list(steps)})


def state(status: SagaStatus, *steps: tuple[str, StepStatus] | StepState) -> SagaState:
    return SagaState(
        status,
        tuple(s if isinstance(s, StepState) else StepState(s[0], s[1]) for s in steps),
    )


def test_compensations_if_failed_in_reverse_order_skipping_steps_without_one() -> None:
    sp = spec(step("a"), step("b", comp=False), step("c"), step("d"), step("e"))
    saga = state(
        S.RUNNING,
        ("a", St.SUCCEEDED),
        ("b", St.SUCCEEDED),
        ("c", St.SUCCEEDED),
        StepState("d", St.RUNNING, attempts=1, in_flight=True),
        ("e", St.PENDING),
    )
    # d's call is in flight: its action may have been applied, so it is compensated.
    assert compensations_if_failed(sp, saga) == ["d", "c", "a"]


def test_compensations_if_failed_follows_what_the_engine_knows() -> None:
    """The engine's own rule on the stored state: a step that failed after a timeout (its
    outcome unknown) is compensated; one that failed with a 400 or is waiting for a retry
    after a refused connection is not."""
    sp = spec(step("a"), step("b"), step("c"), step("d"))
    saga = state(
        S.RUNNING,
        ("a", St.SUCCEEDED),
        StepState("b", St.FAILED, attempts=3, maybe_applied=True),
        StepState("c", St.FAILED, attempts=1),
        StepState("d", St.RUNNING, attempts=1),
    )
    assert compensations_if_failed(sp, saga) == ["b", "a"]


def test_compensations_if_failed_skips_steps_that_did_not_apply() -> None:
    sp = spec(step("a"), step("b", critical=False), step("c"), step("d"))
    saga = state(
        S.RUNNING, ("a", St.SUCCEEDED), ("b", St.FAILED), ("c", St.FALLBACK), ("d", St.PENDING)
    )
    assert compensations_if_failed(sp, saga) == ["a"]


def test_compensations_if_failed_nothing_before_the_first_step_succeeds() -> None:
    sp = spec(step("a"), step("b"))
    assert compensations_if_failed(sp, state(S.RUNNING, ("a", St.PENDING), ("b", St.PENDING))) == []


def test_compensations_if_failed_empty_after_the_pivot_succeeded() -> None:
    sp = spec(step("a"), step("b", pivot=True), step("c"))
    in_flight = StepState("b", St.RUNNING, attempts=1, in_flight=True)
    before = state(S.RUNNING, ("a", St.SUCCEEDED), in_flight, ("c", St.PENDING))
    assert compensations_if_failed(sp, before) == ["b", "a"]
    after = state(S.RUNNING, ("a", St.SUCCEEDED), ("b", St.SUCCEEDED), ("c", St.RUNNING))
    assert compensations_if_failed(sp, after) == []


@pytest.mark.parametrize("status", [S.COMPENSATING, S.COMPLETED, S.COMPENSATED, S.FAILED])
def test_compensations_if_failed_only_for_a_running_saga(status: SagaStatus) -> None:
    sp = spec(step("a"), step("b"))
    assert (
        compensations_if_failed(sp, state(status, ("a", St.SUCCEEDED), ("b", St.SUCCEEDED))) == []
    )


# --- sessions, CSRF and login limits -----------------------------------------------------

TOKEN = "admin-token-for-unit-tests"
NOW = 1_750_000_000.0


def _flip(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def test_session_secrets_are_random_and_only_their_digest_is_kept() -> None:
    one, two = auth.new_secret(), auth.new_secret()
    assert one != two and len(one) >= 43  # 256 bits, urlsafe base64
    assert auth.digest(one) != one and len(auth.digest(one)) == 64
    assert auth.digest(one) == auth.digest(one) != auth.digest(two)


def test_a_non_ascii_csrf_token_is_rejected_not_an_error() -> None:
    # A form field is attacker-controlled text: it must be refused, not raise.
    assert not auth.valid_csrf(TOKEN, auth.new_secret(), "\u00e9t\u00e9")


def test_csrf_token_is_bound_to_the_session_cookie() -> None:
    one, two = auth.new_secret(), auth.new_secret()
    token = auth.csrf_token(TOKEN, one)
    assert auth.valid_csrf(TOKEN, one, token)
    assert not auth.valid_csrf(TOKEN, two, token)
    assert not auth.valid_csrf(TOKEN, one, auth.csrf_token(TOKEN, two))
    assert not auth.valid_csrf(TOKEN, one, _flip(token))
    assert not auth.valid_csrf(TOKEN, one, "")
    assert not auth.valid_csrf(TOKEN, one, None)
    assert not auth.valid_csrf(TOKEN, None, token)
    # Rotating the admin token invalidates the CSRF token too.
    assert not auth.valid_csrf("another-admin-token", one, token)


def test_failed_logins_are_limited_per_client_address() -> None:
    limiter = auth.LoginLimiter(failures=3, window=60)
    for i in range(3):
        assert limiter.retry_after("10.0.0.1", NOW + i) == 0
        limiter.failed("10.0.0.1", NOW + i)
    assert limiter.retry_after("10.0.0.1", NOW + 3) == pytest.approx(57)
    assert limiter.retry_after("10.0.0.2", NOW + 3) == 0  # another address is not held
    assert limiter.retry_after("10.0.0.1", NOW + 60.5) == 0  # the first failure aged out
    for i in range(3):
        limiter.failed("10.0.0.1", NOW + 100 + i)
    assert limiter.retry_after("10.0.0.1", NOW + 103) == pytest.approx(57)
    assert limiter.retry_after("10.0.0.1", NOW + 200) == 0
