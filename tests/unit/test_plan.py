"""The failure plan (`app.core.plan`): for each step and failure kind, what the engine's
own decisions do in a saga where that step fails that way on every attempt."""

from __future__ import annotations

from typing import Any

import pytest

from app.core.definition import DefinitionSpec, ServiceSpec
from app.core.plan import Failure, FailureKind, Then, failure_plan
from app.core.states import ErrorKind, SagaStatus

K = FailureKind
EXACT = {"initial_interval_seconds": 1, "backoff_coefficient": 2, "jitter": False}


def definition(*steps: dict[str, Any], **extra: Any) -> DefinitionSpec:
    return DefinitionSpec.model_validate({"name": "flow", "steps": list(steps), **extra})


def step(name: str, compensate: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "action": {"service": "svc", "path": f"/{name}"}}
    if compensate:
        doc["compensation"] = {"service": "svc", "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


def plan_of(spec: DefinitionSpec, **services: ServiceSpec) -> dict[str, dict[K, Failure | None]]:
    return {s.name: dict(s.failures) for s in failure_plan(spec, services)}


def only(spec: DefinitionSpec, name: str, kind: K, **services: ServiceSpec) -> Failure:
    found = plan_of(spec, **services)[name][kind]
    assert found is not None
    return found


# --- the contract's example ---------------------------------------------------------------

CHECKOUT = definition(
    step(
        "charge_payment",
        retry={"max_attempts": 4, "initial_interval_seconds": 0.2, "max_interval_seconds": 10},
    ),
    step(
        "create_order",
        retry={"max_attempts": 4, "initial_interval_seconds": 0.2, "max_interval_seconds": 10},
    ),
    step("send_receipt", compensate=False, critical=False),
    timeout_seconds=300,
)


def test_a_retried_5xx_compensates_the_step_itself_as_unknown_then_the_earlier_ones() -> None:
    got = only(CHECKOUT, "create_order", K.HTTP_5XX)
    assert got == Failure(
        attempts=4,
        retry_window_seconds=(0.0, 1.4),  # jittered 0.2 + 0.4 + 0.8
        then=Then.COMPENSATE,
        compensates=("create_order?", "charge_payment"),
        final_status=SagaStatus.COMPENSATED,
        error_kind=ErrorKind.HTTP_STATUS,
    )


def test_a_4xx_is_final_at_once_and_the_step_is_known_not_to_have_happened() -> None:
    got = only(CHECKOUT, "create_order", K.HTTP_4XX)
    assert (got.attempts, got.retry_window_seconds) == (1, (0.0, 0.0))
    assert got.compensates == ("charge_payment",)
    assert got.then is Then.COMPENSATE and got.final_status is SagaStatus.COMPENSATED


def test_a_timeout_is_unknown_and_a_refused_connection_is_not() -> None:
    timeout = only(CHECKOUT, "create_order", K.TIMEOUT)
    refused = only(CHECKOUT, "create_order", K.CONNECTION)
    assert timeout.compensates == ("create_order?", "charge_payment")
    assert refused.compensates == ("charge_payment",)
    assert timeout.attempts == refused.attempts == 4
    assert timeout.error_kind is ErrorKind.TIMEOUT
    assert refused.error_kind is ErrorKind.CONNECTION


def test_the_first_step_failing_for_good_leaves_nothing_to_compensate() -> None:
    got = only(CHECKOUT, "charge_payment", K.HTTP_4XX)
    assert got.compensates == ()
    assert got.final_status is SagaStatus.COMPENSATED


def test_every_step_has_every_kind() -> None:
    plan = failure_plan(CHECKOUT)
    assert [s.name for s in plan] == ["charge_payment", "create_order", "send_receipt"]
    for s in plan:
        assert list(s.failures) == list(FailureKind)
        assert all(f is not None for f in s.failures.values())


# --- non-critical steps, fallbacks, steps without compensation -------------------------------


def test_a_non_critical_step_is_recorded_and_the_saga_goes_on() -> None:
    for kind in (K.HTTP_4XX, K.HTTP_5XX, K.TIMEOUT, K.CONNECTION):
        got = only(CHECKOUT, "send_receipt", kind)
        assert got.then is Then.CONTINUE, kind
        assert got.compensates == ()
        assert got.final_status is SagaStatus.COMPLETED
        assert got.error_kind is None


def test_a_fallback_stands_in_and_the_saga_completes() -> None:
    spec = definition(
        step("a"), step("score", fallback={"response": {"score": 0}}), step("b"), timeout_seconds=60
    )
    for kind in (K.HTTP_4XX, K.HTTP_5XX, K.TIMEOUT, K.CONNECTION):
        got = only(spec, "score", kind)
        assert (got.then, got.final_status, got.compensates) == (
            Then.FALLBACK,
            SagaStatus.COMPLETED,
            (),
        ), kind


def test_steps_without_a_compensation_are_left_out() -> None:
    spec = definition(step("a"), step("b", compensate=False), step("c", compensate=False))
    assert only(spec, "c", K.HTTP_5XX).compensates == ("a",)  # c? has nothing to undo it
    assert only(spec, "c", K.HTTP_4XX).compensates == ("a",)


def test_a_non_critical_step_that_succeeded_is_compensated_when_a_later_one_fails() -> None:
    spec = definition(step("a"), step("note", critical=False), step("b"))
    assert only(spec, "b", K.HTTP_4XX).compensates == ("note", "a")


# --- the pivot -------------------------------------------------------------------------------

PIVOTED = definition(
    step("reserve"),
    step("charge", pivot=True),
    step("ship", compensate=False),
    step("mail", compensate=False, critical=False),
    timeout_seconds=120,
)


def test_the_pivot_failing_unwinds_like_any_step_before_it() -> None:
    got = only(PIVOTED, "charge", K.HTTP_5XX)
    assert got.then is Then.COMPENSATE
    assert got.compensates == ("charge?", "reserve")


def test_a_critical_step_past_the_pivot_is_dead_lettered_and_never_compensates() -> None:
    for kind in (K.HTTP_4XX, K.HTTP_5XX, K.TIMEOUT, K.CONNECTION, K.DEADLINE):
        got = only(PIVOTED, "ship", kind)
        assert got.then is Then.DEAD_LETTER, kind
        assert got.compensates == ()
        assert got.final_status is SagaStatus.FAILED


def test_past_the_pivot_the_deadline_does_not_stop_retries() -> None:
    got = only(PIVOTED, "ship", K.DEADLINE)
    assert got.attempts == 3  # every attempt of the policy, the deadline long gone
    assert got.error_kind is ErrorKind.TIMEOUT


def test_past_the_pivot_an_open_circuit_is_waited_out_whatever_the_deadline() -> None:
    got = only(PIVOTED, "ship", K.CIRCUIT_OPEN)
    assert (got.attempts, got.then, got.final_status) == (0, Then.WAIT, SagaStatus.RUNNING)


def test_a_non_critical_step_past_the_pivot_continues() -> None:
    assert only(PIVOTED, "mail", K.HTTP_5XX).then is Then.CONTINUE


# --- open circuits and deadlines ---------------------------------------------------------------


def test_an_open_circuit_without_a_deadline_waits_without_spending_attempts() -> None:
    spec = definition(step("a"), step("b"))
    got = only(spec, "b", K.CIRCUIT_OPEN)
    assert got == Failure(0, (0.0, 0.0), Then.WAIT, (), SagaStatus.RUNNING, None)


def test_an_open_circuit_until_the_deadline_compensates_the_steps_before() -> None:
    spec = definition(step("a"), step("b"), timeout_seconds=45)
    got = only(spec, "b", K.CIRCUIT_OPEN)
    assert (got.attempts, got.then, got.compensates) == (0, Then.COMPENSATE, ("a",))
    assert got.error_kind is ErrorKind.CIRCUIT_OPEN


def test_a_recovery_timeout_under_a_microsecond_is_planned_like_any_other() -> None:
    """The breaker of such a service reopens at once (the clock cannot tell the times
    apart): planning an open circuit there must not fail (a fuzzed registration found
    it), and the saga still waits on the circuit until its deadline."""
    spec = definition(step("a"), step("b"), timeout_seconds=45)
    svc = ServiceSpec.model_validate(
        {"base_url": "http://127.0.0.1:9", "circuit_breaker": {"recovery_timeout_seconds": 1e-9}}
    )
    got = only(spec, "b", K.CIRCUIT_OPEN, svc=svc)
    assert (got.attempts, got.then, got.compensates) == (0, Then.COMPENSATE, ("a",))
    assert got.error_kind is ErrorKind.CIRCUIT_OPEN


def test_the_deadline_passing_during_a_step_compensates_it_as_unknown() -> None:
    spec = definition(step("a"), step("b"), step("c"), timeout_seconds=30)
    got = only(spec, "b", K.DEADLINE)
    assert (got.attempts, got.compensates) == (1, ("b?", "a"))
    assert got.error_kind is ErrorKind.DEADLINE


def test_without_a_deadline_the_deadline_kind_cannot_happen() -> None:
    assert plan_of(definition(step("a")))["a"][K.DEADLINE] is None


def test_the_deadline_cuts_the_retries_short() -> None:
    # Delays 2, 4, 8, 16 s (60 s in all); the deadline at 10 s comes during the third
    # delay: three attempts (at 0, 2 and 6 s), then the saga unwinds as deadline.
    retry = {**EXACT, "initial_interval_seconds": 2, "max_attempts": 5}
    spec = definition(step("a"), step("b", retry=retry), timeout_seconds=10)
    got = only(spec, "b", K.HTTP_5XX)
    assert got.attempts == 3
    assert got.retry_window_seconds == (6.0, 6.0)
    assert got.error_kind is ErrorKind.DEADLINE
    assert got.compensates == ("b?", "a")
    assert got.note is not None and "deadline" in got.note


def test_with_jitter_the_deadline_may_or_may_not_cut_the_retries() -> None:
    retry = {"initial_interval_seconds": 2, "max_attempts": 5, "jitter": True}
    spec = definition(step("a"), step("b", retry=retry), timeout_seconds=10)
    got = only(spec, "b", K.HTTP_5XX)
    assert got.attempts == 3  # the longest delays: the worst case is reported
    assert got.retry_window_seconds == (0.0, 6.0)
    assert got.note is not None and "up to 5 attempts" in got.note


def test_timeouts_count_towards_the_deadline() -> None:
    # Each attempt waits out the service's 4 s timeout: the second ends at 4 + 1 + 4 = 9 s,
    # and the deadline at 10 s comes before the third (due at 9 + 2 = 11 s).
    retry = {**EXACT, "max_attempts": 3}
    spec = definition(step("a"), step("b", retry=retry), timeout_seconds=10)
    slow = ServiceSpec.model_validate({"base_url": "http://svc.test", "timeout_seconds": 4})
    got = only(spec, "b", K.TIMEOUT, svc=slow)
    assert got.attempts == 2
    assert got.retry_window_seconds == (1.0, 1.0)  # attempt durations aside
    assert got.error_kind is ErrorKind.DEADLINE
    assert only(spec, "b", K.TIMEOUT).attempts == 1  # the default 10 s timeout


def test_a_step_timeout_overrides_the_service_timeout() -> None:
    retry = {**EXACT, "max_attempts": 3}
    spec = definition(step("b", retry=retry, timeout_seconds=1), timeout_seconds=10)
    slow = ServiceSpec.model_validate({"base_url": "http://svc.test", "timeout_seconds": 9})
    got = only(spec, "b", K.TIMEOUT, svc=slow)
    assert (got.attempts, got.error_kind) == (3, ErrorKind.TIMEOUT)


# --- absolute URLs -------------------------------------------------------------------------------


def test_an_absolute_url_has_no_circuit_to_be_open() -> None:
    spec = definition(
        step("a"),
        {"name": "hook", "action": {"url": "https://hooks.example.com/x"}},
        timeout_seconds=60,
    )
    plan = plan_of(spec)
    assert plan["hook"][K.CIRCUIT_OPEN] is None
    assert plan["hook"][K.HTTP_5XX] is not None
    assert plan["hook"][K.HTTP_5XX].compensates == ("a",)  # the hook has no compensation


# --- the retry window ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "window"),
    [
        ({**EXACT, "max_attempts": 4}, (7.0, 7.0)),  # 1 + 2 + 4, exactly
        ({**EXACT, "max_attempts": 4, "jitter": True}, (0.0, 7.0)),  # full jitter: from 0
        ({**EXACT, "max_attempts": 5, "max_interval_seconds": 3}, (9.0, 9.0)),  # 1 + 2 + 3 + 3
        ({**EXACT, "max_attempts": 1}, (0.0, 0.0)),  # no retries
        ({**EXACT, "max_attempts": 3, "backoff_coefficient": 1}, (2.0, 2.0)),
    ],
)
def test_the_window_sums_the_delay_bounds(
    retry: dict[str, Any], window: tuple[float, float]
) -> None:
    spec = definition(step("a", retry=retry))
    for kind in (K.HTTP_5XX, K.TIMEOUT, K.CONNECTION):
        assert only(spec, "a", kind).retry_window_seconds == window, kind
    assert only(spec, "a", K.HTTP_4XX).retry_window_seconds == (0.0, 0.0)


def test_a_5xx_that_is_not_retried_fails_at_once_with_an_unknown_outcome() -> None:
    spec = definition(step("a"), step("b", retry={"retry_on_status": [429]}))
    got = only(spec, "b", K.HTTP_5XX)
    assert (got.attempts, got.compensates) == (1, ("b?", "a"))


def test_the_4xx_case_uses_a_status_that_is_not_retried() -> None:
    retry = {**EXACT, "retry_on_status": [400, 503]}
    got = only(definition(step("a", retry=retry)), "a", K.HTTP_4XX)
    assert got.attempts == 1


def test_a_long_definition_is_planned_whole() -> None:
    spec = definition(*(step(f"s{i}") for i in range(30)), timeout_seconds=600)
    plan = plan_of(spec)
    last = plan["s29"][K.HTTP_4XX]
    assert last is not None
    assert last.compensates == tuple(f"s{i}" for i in range(28, -1, -1))


def test_a_deadline_under_a_microsecond_is_past_before_the_first_step() -> None:
    spec = definition(step("a"), step("b"), timeout_seconds=1e-7)
    assert all(f is None for s in failure_plan(spec) for f in s.failures.values())
