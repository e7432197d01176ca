"""The planner: what happens next for a saga, and what an attempt's outcome leads to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.core.commit import SagaError, SagaState, StepState, Waiting
from app.core.decide import (
    BeginCompensation,
    Call,
    Finish,
    Transition,
    after_attempt,
    needs_compensation,
    pivot_passed,
)
from app.core.decide import next_action as plan
from app.core.definition import DefinitionSpec
from app.core.outcome import Outcome
from app.core.states import Direction, ErrorKind, SagaStatus, StepStatus, WaitReason

S = SagaStatus
T = StepStatus
ACTION = Direction.ACTION
COMP = Direction.COMPENSATION
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

# Retry schedule without jitter so delays are exact: 1, 2, 4, ...
NO_JITTER = {"jitter": False, "initial_interval_seconds": 1, "backoff_coefficient": 2}

OK = Outcome(success=True, retryable=False, maybe_applied=True, error_kind=None, message="")
TIMEOUT = Outcome(False, True, True, ErrorKind.TIMEOUT, "no answer within 2s")
CONNECT = Outcome(False, True, False, ErrorKind.CONNECTION, "cannot connect")
HTTP_503 = Outcome(False, True, True, ErrorKind.HTTP_STATUS, "participant answered 503")
HTTP_400 = Outcome(False, False, False, ErrorKind.HTTP_STATUS, "participant answered 400")
HTTP_501 = Outcome(False, False, True, ErrorKind.HTTP_STATUS, "participant answered 501")
TEMPLATE = Outcome(False, False, False, ErrorKind.TEMPLATE, "${input.x}: nothing at 'x'")


def step(name: str, *, comp: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": "svc", "path": f"/{name}"},
        "retry": dict(NO_JITTER),
        "compensation_retry": {**NO_JITTER, "max_attempts": 4},
    }
    if comp:
        doc["compensation"] = {"service": "svc", "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


def spec(*steps: dict[str, Any]) -> DefinitionSpec:
    return DefinitionSpec.model_validate({"name": "flow", "steps": list(steps)})


def saga(status: SagaStatus, *steps: StepStatus | StepState, **extra: Any) -> SagaState:
    states = [s if isinstance(s, StepState) else StepState(f"s{i}", s) for i, s in enumerate(steps)]
    return SagaState(status=status, steps=states, **extra)


def applied(index: int, status: StepStatus) -> StepState:
    """A step whose action may have happened although it was not seen to succeed."""
    return StepState(f"s{index}", status, attempts=1, maybe_applied=True)


THREE = spec(step("s0"), step("s1"), step("s2"))


# --- plan: running forward ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ((T.PENDING, T.PENDING, T.PENDING), Call(0, ACTION)),
        ((T.SUCCEEDED, T.PENDING, T.PENDING), Call(1, ACTION)),
        ((T.SUCCEEDED, T.SUCCEEDED, T.PENDING), Call(2, ACTION)),
        ((T.RUNNING, T.PENDING, T.PENDING), Call(0, ACTION)),  # a retry is due
        ((T.SUCCEEDED, T.RUNNING, T.PENDING), Call(1, ACTION)),
        ((T.FALLBACK, T.FAILED, T.PENDING), Call(2, ACTION)),  # fallback + non-critical
        ((T.SUCCEEDED, T.FALLBACK, T.RUNNING), Call(2, ACTION)),
    ],
)
def test_running_saga_calls_the_first_unfinished_step(
    steps: tuple[StepStatus, ...], expected: Call
) -> None:
    assert plan(THREE, saga(S.RUNNING, *steps), NOW) == expected


@pytest.mark.parametrize(
    "steps",
    [
        (T.SUCCEEDED, T.SUCCEEDED, T.SUCCEEDED),
        (T.SUCCEEDED, T.FALLBACK, T.SUCCEEDED),
        (T.SUCCEEDED, T.SUCCEEDED, T.FAILED),  # a non-critical step failed
        (T.FALLBACK, T.FAILED, T.FALLBACK),
    ],
)
def test_running_saga_with_all_steps_done_completes(steps: tuple[StepStatus, ...]) -> None:
    assert plan(THREE, saga(S.RUNNING, *steps), NOW) == Finish(S.COMPLETED)


def test_cancel_requested_begins_compensation() -> None:
    state = saga(S.RUNNING, T.SUCCEEDED, T.RUNNING, T.PENDING, cancel_requested=True)
    assert plan(THREE, state, NOW) == BeginCompensation(
        SagaError(None, ErrorKind.CANCELLED, "cancelled on request")
    )


def test_cancel_before_the_pivot_succeeded_begins_compensation() -> None:
    pivoted = spec(step("s0"), step("s1", pivot=True), step("s2"))
    for pivot_status in (T.PENDING, T.RUNNING, T.FAILED):
        state = saga(S.RUNNING, T.SUCCEEDED, pivot_status, T.PENDING, cancel_requested=True)
        assert plan(pivoted, state, NOW) == BeginCompensation(
            SagaError(None, ErrorKind.CANCELLED, "cancelled on request")
        )


def test_cancel_after_the_pivot_goes_on_forward() -> None:
    pivoted = spec(step("s0"), step("s1", pivot=True), step("s2"))
    state = saga(S.RUNNING, T.SUCCEEDED, T.SUCCEEDED, T.PENDING, cancel_requested=True)
    assert plan(pivoted, state, NOW) == Call(2, ACTION)
    done = saga(S.RUNNING, T.SUCCEEDED, T.SUCCEEDED, T.SUCCEEDED, cancel_requested=True)
    assert plan(pivoted, done, NOW) == Finish(S.COMPLETED)


@pytest.mark.parametrize("late_by", [timedelta(0), timedelta(microseconds=1), timedelta(hours=1)])
def test_deadline_passed_begins_compensation(late_by: timedelta) -> None:
    state = saga(S.RUNNING, T.SUCCEEDED, T.RUNNING, T.PENDING, deadline_at=NOW - late_by)
    assert plan(THREE, state, NOW) == BeginCompensation(
        SagaError("s1", ErrorKind.DEADLINE, "the saga's timeout_seconds passed")
    )


def test_deadline_error_names_the_first_unfinished_step() -> None:
    state = saga(S.RUNNING, T.SUCCEEDED, T.FALLBACK, T.PENDING, deadline_at=NOW)
    nxt = plan(THREE, state, NOW)
    assert isinstance(nxt, BeginCompensation)
    assert nxt.error.step == "s2"


def test_deadline_not_yet_passed_goes_on() -> None:
    state = saga(
        S.RUNNING, T.SUCCEEDED, T.PENDING, T.PENDING, deadline_at=NOW + timedelta(seconds=1)
    )
    assert plan(THREE, state, NOW) == Call(1, ACTION)


def test_deadline_after_the_pivot_goes_on_forward() -> None:
    pivoted = spec(step("s0", pivot=True), step("s1"), step("s2"))
    state = saga(S.RUNNING, T.SUCCEEDED, T.PENDING, T.PENDING, deadline_at=NOW - timedelta(1))
    assert plan(pivoted, state, NOW) == Call(1, ACTION)


def test_cancel_wins_over_deadline() -> None:
    state = saga(S.RUNNING, T.PENDING, T.PENDING, T.PENDING, cancel_requested=True, deadline_at=NOW)
    nxt = plan(THREE, state, NOW)
    assert isinstance(nxt, BeginCompensation)
    assert nxt.error.kind is ErrorKind.CANCELLED


@pytest.mark.parametrize("status", [T.COMPENSATING, T.COMPENSATED, T.COMPENSATION_FAILED])
def test_running_saga_with_an_unwinding_step_is_an_error(status: StepStatus) -> None:
    with pytest.raises(ValueError):
        plan(THREE, saga(S.RUNNING, T.SUCCEEDED, status, T.PENDING), NOW)


# --- plan: compensating ------------------------------------------------------------------


def test_compensation_runs_in_reverse_order() -> None:
    # s2 failed for good without having happened: only s1 and s0 are undone.
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.SUCCEEDED, T.FAILED)
    assert plan(THREE, state, NOW) == Call(1, COMP)
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.COMPENSATED, T.FAILED)
    assert plan(THREE, state, NOW) == Call(0, COMP)
    state = saga(S.COMPENSATING, T.COMPENSATED, T.COMPENSATED, T.FAILED)
    assert plan(THREE, state, NOW) == Finish(S.COMPENSATED)


def test_failed_step_with_unknown_outcome_is_compensated_first() -> None:
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.SUCCEEDED, applied(2, T.FAILED))
    assert plan(THREE, state, NOW) == Call(2, COMP)


def test_steps_without_compensation_are_skipped() -> None:
    definition = spec(step("s0"), step("s1", comp=False), step("s2", comp=False))
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.SUCCEEDED, applied(2, T.FAILED))
    assert plan(definition, state, NOW) == Call(0, COMP)
    state = saga(S.COMPENSATING, T.COMPENSATED, T.SUCCEEDED, applied(2, T.FAILED))
    assert plan(definition, state, NOW) == Finish(S.COMPENSATED)


def test_steps_never_applied_are_skipped() -> None:
    # s1 is waiting for a retry after a connect failure; s2 never started.
    state = saga(S.COMPENSATING, T.SUCCEEDED, StepState("s1", T.RUNNING, attempts=1), T.PENDING)
    assert plan(THREE, state, NOW) == Call(0, COMP)


def test_step_left_running_by_a_crash_is_compensated() -> None:
    state = saga(S.COMPENSATING, T.SUCCEEDED, applied(1, T.RUNNING), T.PENDING)
    assert plan(THREE, state, NOW) == Call(1, COMP)


def test_compensation_being_retried_is_called_again() -> None:
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.COMPENSATING, T.FAILED)
    assert plan(THREE, state, NOW) == Call(1, COMP)


def test_fallback_step_compensated_only_when_maybe_applied() -> None:
    state = saga(S.COMPENSATING, T.SUCCEEDED, T.FALLBACK, T.FAILED)
    assert plan(THREE, state, NOW) == Call(0, COMP)
    state = saga(S.COMPENSATING, T.SUCCEEDED, applied(1, T.FALLBACK), T.FAILED)
    assert plan(THREE, state, NOW) == Call(1, COMP)


@pytest.mark.parametrize(
    "steps",
    [
        (T.FAILED, T.PENDING, T.PENDING),  # the first step failed without happening
        (T.COMPENSATED, T.COMPENSATED, T.FAILED),
        (T.COMPENSATED, T.PENDING, T.PENDING),
        (T.PENDING, T.PENDING, T.PENDING),  # cancelled before anything ran
    ],
)
def test_nothing_left_to_compensate_finishes(steps: tuple[StepStatus, ...]) -> None:
    assert plan(THREE, saga(S.COMPENSATING, *steps), NOW) == Finish(S.COMPENSATED)


def test_compensating_ignores_cancel_and_deadline() -> None:
    state = saga(
        S.COMPENSATING,
        T.SUCCEEDED,
        T.COMPENSATED,
        T.FAILED,
        cancel_requested=True,
        deadline_at=NOW - timedelta(hours=1),
    )
    assert plan(THREE, state, NOW) == Call(0, COMP)


# --- plan: terminal ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [S.COMPLETED, S.COMPENSATED, S.FAILED])
def test_terminal_saga_has_nothing_to_do(status: SagaStatus) -> None:
    state = saga(
        status,
        T.SUCCEEDED,
        T.FAILED,
        T.FALLBACK,
        cancel_requested=True,
        deadline_at=NOW - timedelta(hours=1),
    )
    assert plan(THREE, state, NOW) is None


@pytest.mark.parametrize("status", [S.COMPENSATED, S.FAILED])
def test_compensated_or_failed_saga_never_calls(status: SagaStatus) -> None:
    # Only an operator's retry (which moves the saga out of FAILED) restarts work.
    state = saga(status, T.COMPENSATED, applied(1, T.FAILED), T.PENDING)
    assert plan(THREE, state, NOW) is None


@pytest.mark.parametrize("retried", [T.PENDING, T.RUNNING])
def test_completed_saga_runs_an_operator_retried_step(retried: StepStatus) -> None:
    state = saga(S.COMPLETED, T.SUCCEEDED, retried, T.SUCCEEDED, cancel_requested=True)
    assert plan(THREE, state, NOW) == Call(1, ACTION)


# --- plan: deadline while waiting on a service --------------------------------------------


def test_deadline_while_waiting_on_an_open_circuit_is_circuit_open() -> None:
    state = saga(
        S.RUNNING,
        T.SUCCEEDED,
        T.RUNNING,
        T.PENDING,
        deadline_at=NOW,
        waiting=Waiting(WaitReason.CIRCUIT_OPEN, "pay"),
    )
    assert plan(THREE, state, NOW) == BeginCompensation(
        SagaError("s1", ErrorKind.CIRCUIT_OPEN, "deadline passed while waiting: circuit_open:pay")
    )


def test_deadline_while_waiting_on_a_bulkhead_is_a_plain_deadline() -> None:
    state = saga(
        S.RUNNING,
        T.SUCCEEDED,
        T.RUNNING,
        T.PENDING,
        deadline_at=NOW,
        waiting=Waiting(WaitReason.BULKHEAD_FULL, "pay"),
    )
    assert plan(THREE, state, NOW) == BeginCompensation(
        SagaError("s1", ErrorKind.DEADLINE, "the saga's timeout_seconds passed")
    )


def test_waiting_without_deadline_passed_goes_on() -> None:
    state = saga(
        S.RUNNING,
        T.SUCCEEDED,
        T.RUNNING,
        T.PENDING,
        deadline_at=NOW + timedelta(seconds=5),
        waiting=Waiting(WaitReason.CIRCUIT_OPEN, "pay"),
    )
    assert plan(THREE, state, NOW) == Call(1, ACTION)


# --- needs_compensation / pivot_passed ---------------------------------------------------


@pytest.mark.parametrize(
    ("status", "maybe_applied", "expected"),
    [
        (T.PENDING, False, False),
        (T.PENDING, True, False),
        (T.RUNNING, False, False),
        (T.RUNNING, True, True),
        (T.SUCCEEDED, False, True),
        (T.SUCCEEDED, True, True),
        (T.FAILED, False, False),
        (T.FAILED, True, True),
        (T.FALLBACK, False, False),
        (T.FALLBACK, True, True),
        (T.COMPENSATING, False, True),
        (T.COMPENSATING, True, True),
        (T.COMPENSATED, True, False),
        (T.COMPENSATION_FAILED, True, False),
    ],
)
def test_needs_compensation(status: StepStatus, maybe_applied: bool, expected: bool) -> None:
    with_comp = spec(step("s0")).steps[0]
    without_comp = spec(step("s0", comp=False)).steps[0]
    state = StepState("s0", status, maybe_applied=maybe_applied)
    assert needs_compensation(with_comp, state) is expected
    assert needs_compensation(without_comp, state) is False


@pytest.mark.parametrize(
    ("pivot_status", "passed"),
    [
        (T.PENDING, False),
        (T.RUNNING, False),
        (T.FAILED, False),
        (T.SUCCEEDED, True),
        (T.COMPENSATING, False),
    ],
)
def test_pivot_passed(pivot_status: StepStatus, passed: bool) -> None:
    pivoted = spec(step("s0"), step("s1", pivot=True), step("s2"))
    assert pivot_passed(pivoted, saga(S.RUNNING, T.SUCCEEDED, pivot_status, T.PENDING)) is passed


def test_no_pivot_never_passed() -> None:
    assert pivot_passed(THREE, saga(S.RUNNING, T.SUCCEEDED, T.SUCCEEDED, T.SUCCEEDED)) is False


def test_saga_error_as_json() -> None:
    error = SagaError("charge", ErrorKind.DEADLINE, "late")
    assert error.as_json() == {"step": "charge", "kind": "deadline", "message": "late"}
    assert SagaError(None, ErrorKind.CANCELLED, "c").as_json() == {
        "step": None,
        "kind": "cancelled",
        "message": "c",
    }


# --- after_attempt: forward ---------------------------------------------------------------


def running(index: int = 1, *, maybe_applied: bool = False, spec_: DefinitionSpec = THREE) -> Any:
    steps: list[StepState] = []
    for i in range(len(spec_.steps)):
        status = T.SUCCEEDED if i < index else T.RUNNING if i == index else T.PENDING
        steps.append(StepState(f"s{i}", status, maybe_applied=i == index and maybe_applied))
    return SagaState(S.RUNNING, steps)


def test_success() -> None:
    assert after_attempt(THREE, running(), Call(1, ACTION), 1, OK) == Transition(
        T.SUCCEEDED, S.RUNNING, continue_now=True, maybe_applied=True
    )


def test_success_on_a_later_attempt() -> None:
    assert after_attempt(THREE, running(), Call(1, ACTION), 3, OK) == Transition(
        T.SUCCEEDED, S.RUNNING, continue_now=True, maybe_applied=True
    )


@pytest.mark.parametrize(
    ("attempt", "outcome", "delay", "maybe_applied"),
    [
        (1, TIMEOUT, 1.0, True),
        (2, TIMEOUT, 2.0, True),
        (1, CONNECT, 1.0, False),
        (2, HTTP_503, 2.0, True),
    ],
)
def test_retryable_with_attempts_left(
    attempt: int, outcome: Outcome, delay: float, maybe_applied: bool
) -> None:
    assert after_attempt(THREE, running(), Call(1, ACTION), attempt, outcome) == Transition(
        T.RUNNING, S.RUNNING, retry_in=delay, maybe_applied=maybe_applied
    )


def test_retry_after_replaces_the_backoff() -> None:
    result = after_attempt(THREE, running(), Call(1, ACTION), 1, HTTP_503, retry_after=7.5)
    assert result == Transition(T.RUNNING, S.RUNNING, retry_in=7.5, maybe_applied=True)


def test_retry_after_capped_by_max_interval() -> None:
    capped = spec(step("s0", retry={**NO_JITTER, "max_interval_seconds": 5}))
    state = SagaState(S.RUNNING, [StepState("s0", T.RUNNING)])
    result = after_attempt(capped, state, Call(0, ACTION), 1, HTTP_503, retry_after=3600)
    assert result.retry_in == 5.0


def test_earlier_maybe_applied_is_sticky() -> None:
    # An earlier attempt timed out; a later connect failure does not clear the doubt.
    state = running(maybe_applied=True)
    assert after_attempt(THREE, state, Call(1, ACTION), 1, CONNECT) == Transition(
        T.RUNNING, S.RUNNING, retry_in=1.0, maybe_applied=True
    )
    exhausted = after_attempt(THREE, state, Call(1, ACTION), 3, HTTP_400)
    assert exhausted.maybe_applied is True


@pytest.mark.parametrize(
    ("outcome", "kind", "maybe_applied"),
    [
        (TIMEOUT, ErrorKind.TIMEOUT, True),
        (CONNECT, ErrorKind.CONNECTION, False),
        (HTTP_503, ErrorKind.HTTP_STATUS, True),
    ],
)
def test_retries_exhausted_begins_compensation(
    outcome: Outcome, kind: ErrorKind, maybe_applied: bool
) -> None:
    # max_attempts defaults to 3
    assert after_attempt(THREE, running(), Call(1, ACTION), 3, outcome) == Transition(
        T.FAILED,
        S.COMPENSATING,
        saga_error=SagaError("s1", kind, outcome.message),
        continue_now=True,
        maybe_applied=maybe_applied,
    )


def test_max_attempts_one_never_retries() -> None:
    once = spec(step("s0", retry={**NO_JITTER, "max_attempts": 1}))
    state = SagaState(S.RUNNING, [StepState("s0", T.RUNNING)])
    result = after_attempt(once, state, Call(0, ACTION), 1, TIMEOUT)
    assert result.step_status is T.FAILED
    assert result.saga_status is S.COMPENSATING
    assert result.retry_in is None


@pytest.mark.parametrize(
    ("outcome", "kind", "maybe_applied"),
    [
        (HTTP_400, ErrorKind.HTTP_STATUS, False),
        (HTTP_501, ErrorKind.HTTP_STATUS, True),
        (TEMPLATE, ErrorKind.TEMPLATE, False),
    ],
)
def test_final_failure_on_first_attempt_is_not_retried(
    outcome: Outcome, kind: ErrorKind, maybe_applied: bool
) -> None:
    assert after_attempt(THREE, running(), Call(1, ACTION), 1, outcome) == Transition(
        T.FAILED,
        S.COMPENSATING,
        saga_error=SagaError("s1", kind, outcome.message),
        continue_now=True,
        maybe_applied=maybe_applied,
    )


def test_failure_without_error_kind_is_recorded_as_http_status() -> None:
    odd = Outcome(False, False, False, None, "odd")
    result = after_attempt(THREE, running(), Call(1, ACTION), 1, odd)
    assert result.saga_error == SagaError("s1", ErrorKind.HTTP_STATUS, "odd")


FALLBACK_SPEC = spec(step("s0"), step("s1", fallback={"response": {"ok": False}}), step("s2"))


def test_fallback_when_the_action_fails_for_good() -> None:
    assert after_attempt(FALLBACK_SPEC, running(), Call(1, ACTION), 1, HTTP_400) == Transition(
        T.FALLBACK, S.RUNNING, use_fallback=True, continue_now=True, maybe_applied=False
    )
    assert after_attempt(FALLBACK_SPEC, running(), Call(1, ACTION), 3, TIMEOUT) == Transition(
        T.FALLBACK, S.RUNNING, use_fallback=True, continue_now=True, maybe_applied=True
    )


def test_fallback_step_is_retried_first() -> None:
    result = after_attempt(FALLBACK_SPEC, running(), Call(1, ACTION), 1, TIMEOUT)
    assert result == Transition(T.RUNNING, S.RUNNING, retry_in=1.0, maybe_applied=True)


def test_fallback_wins_over_non_critical() -> None:
    both = spec(step("s0"), step("s1", critical=False, fallback={"response": 1}), step("s2"))
    result = after_attempt(both, running(), Call(1, ACTION), 1, HTTP_400)
    assert result.step_status is T.FALLBACK
    assert result.use_fallback is True
    assert result.dead_letter is False


def test_non_critical_failure_is_isolated() -> None:
    lenient = spec(step("s0"), step("s1", critical=False), step("s2"))
    assert after_attempt(lenient, running(), Call(1, ACTION), 1, HTTP_400) == Transition(
        T.FAILED, S.RUNNING, dead_letter=True, continue_now=True, maybe_applied=False
    )
    assert after_attempt(lenient, running(), Call(1, ACTION), 3, HTTP_503) == Transition(
        T.FAILED, S.RUNNING, dead_letter=True, continue_now=True, maybe_applied=True
    )


def test_non_critical_step_is_retried_first() -> None:
    lenient = spec(step("s0"), step("s1", critical=False), step("s2"))
    result = after_attempt(lenient, running(), Call(1, ACTION), 2, CONNECT)
    assert result == Transition(T.RUNNING, S.RUNNING, retry_in=2.0, maybe_applied=False)


PIVOT_FIRST = spec(step("s0", pivot=True), step("s1"), step("s2"))


def test_critical_failure_after_the_pivot_parks_the_saga() -> None:
    assert after_attempt(PIVOT_FIRST, running(), Call(1, ACTION), 3, TIMEOUT) == Transition(
        T.FAILED,
        S.FAILED,
        saga_error=SagaError("s1", ErrorKind.TIMEOUT, TIMEOUT.message),
        dead_letter=True,
        maybe_applied=True,
    )


def test_critical_failure_after_the_pivot_is_still_retried_by_its_policy() -> None:
    result = after_attempt(PIVOT_FIRST, running(), Call(1, ACTION), 2, TIMEOUT)
    assert result == Transition(T.RUNNING, S.RUNNING, retry_in=2.0, maybe_applied=True)


def test_critical_failure_before_the_pivot_compensates() -> None:
    pivot_last = spec(step("s0"), step("s1"), step("s2", pivot=True))
    result = after_attempt(pivot_last, running(), Call(1, ACTION), 1, HTTP_400)
    assert result == Transition(
        T.FAILED,
        S.COMPENSATING,
        saga_error=SagaError("s1", ErrorKind.HTTP_STATUS, HTTP_400.message),
        continue_now=True,
        maybe_applied=False,
    )


def test_failing_pivot_itself_compensates() -> None:
    pivot_mid = spec(step("s0"), step("s1", pivot=True), step("s2"))
    result = after_attempt(pivot_mid, running(), Call(1, ACTION), 1, HTTP_400)
    assert result.saga_status is S.COMPENSATING
    assert result.dead_letter is False


def test_non_critical_after_pivot_goes_on() -> None:
    lenient = spec(step("s0", pivot=True), step("s1", critical=False), step("s2"))
    result = after_attempt(lenient, running(), Call(1, ACTION), 1, HTTP_400)
    assert result == Transition(
        T.FAILED, S.RUNNING, dead_letter=True, continue_now=True, maybe_applied=False
    )


# --- after_attempt: compensation ----------------------------------------------------------


def compensating(status: StepStatus = T.COMPENSATING, *, maybe_applied: bool = False) -> SagaState:
    return SagaState(
        S.COMPENSATING,
        [
            StepState("s0", T.SUCCEEDED),
            StepState("s1", status, maybe_applied=maybe_applied),
            StepState("s2", T.FAILED),
        ],
    )


def test_compensation_success() -> None:
    assert after_attempt(THREE, compensating(), Call(1, COMP), 1, OK) == Transition(
        T.COMPENSATED, S.COMPENSATING, continue_now=True, maybe_applied=True
    )
    state = compensating(maybe_applied=True)
    assert after_attempt(THREE, state, Call(1, COMP), 2, OK).maybe_applied is True


@pytest.mark.parametrize(
    ("attempt", "outcome", "delay"),
    [(1, TIMEOUT, 1.0), (2, CONNECT, 2.0), (3, HTTP_503, 4.0)],
)
def test_compensation_retry_uses_the_compensation_policy(
    attempt: int, outcome: Outcome, delay: float
) -> None:
    # The action policy allows 3 attempts; compensation_retry allows 4 here.
    result = after_attempt(THREE, compensating(), Call(1, COMP), attempt, outcome)
    assert result == Transition(
        T.COMPENSATING, S.COMPENSATING, retry_in=delay, maybe_applied=outcome.maybe_applied
    )


def test_compensation_retry_honours_retry_after() -> None:
    result = after_attempt(THREE, compensating(), Call(1, COMP), 1, HTTP_503, retry_after=0.25)
    assert result.retry_in == 0.25
    assert result.step_status is T.COMPENSATING


def test_compensation_default_policy_allows_ten_attempts() -> None:
    defaults = DefinitionSpec.model_validate(
        {
            "name": "flow",
            "steps": [
                {
                    "name": "s0",
                    "action": {"service": "svc", "path": "/a"},
                    "compensation": {"service": "svc", "path": "/b"},
                }
            ],
        }
    )
    state = SagaState(S.COMPENSATING, [StepState("s0", T.COMPENSATING)])
    assert after_attempt(defaults, state, Call(0, COMP), 9, TIMEOUT).retry_in is not None
    final = after_attempt(defaults, state, Call(0, COMP), 10, TIMEOUT)
    assert final.retry_in is None
    assert final.step_status is T.COMPENSATION_FAILED


@pytest.mark.parametrize(
    ("attempt", "outcome"),
    [(4, TIMEOUT), (4, CONNECT), (1, HTTP_400), (1, TEMPLATE), (2, HTTP_501)],
)
def test_compensation_exhausted_fails_the_saga(attempt: int, outcome: Outcome) -> None:
    result = after_attempt(THREE, compensating(), Call(1, COMP), attempt, outcome)
    assert result == Transition(
        T.COMPENSATION_FAILED,
        S.FAILED,
        dead_letter=True,
        maybe_applied=outcome.maybe_applied,
    )
    assert result.saga_error is None
    assert result.continue_now is False


# --- after_attempt: an operator's retry of a completed saga's step -------------------------


def completed_retry() -> SagaState:
    return SagaState(
        S.COMPLETED,
        [StepState("s0", T.SUCCEEDED), StepState("s1", T.RUNNING), StepState("s2", T.SUCCEEDED)],
    )


def test_retried_step_of_completed_saga_succeeds_and_saga_stays_completed() -> None:
    assert after_attempt(THREE, completed_retry(), Call(1, ACTION), 1, OK) == Transition(
        T.SUCCEEDED, S.COMPLETED, continue_now=True, maybe_applied=True
    )


def test_retried_step_of_completed_saga_retries_and_stays_completed() -> None:
    assert after_attempt(THREE, completed_retry(), Call(1, ACTION), 1, TIMEOUT) == Transition(
        T.RUNNING, S.COMPLETED, retry_in=1.0, maybe_applied=True
    )


def test_retried_step_of_completed_saga_fails_into_a_dead_letter() -> None:
    # Even a critical step never unwinds a completed saga.
    assert after_attempt(THREE, completed_retry(), Call(1, ACTION), 1, HTTP_400) == Transition(
        T.FAILED, S.COMPLETED, dead_letter=True, continue_now=True, maybe_applied=False
    )
