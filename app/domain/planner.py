"""The planner: given a saga's state, what happens next; given an attempt's outcome,
what the saga and step become. Pure functions over plain values, so every branch of
the failure model is unit-tested without a database or a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.domain.definition import DefinitionSpec, StepSpec
from app.domain.states import Direction, ErrorKind, SagaStatus, StepStatus
from app.resilience.outcome import Outcome
from app.resilience.retry import decide_retry

# Statuses a step can be in once forward work on it is over.
FORWARD_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.FALLBACK, StepStatus.FAILED})


@dataclass(slots=True)
class StepState:
    name: str
    status: StepStatus
    attempts: int = 0
    compensation_attempts: int = 0
    maybe_applied: bool = False


@dataclass(slots=True)
class SagaState:
    status: SagaStatus
    steps: list[StepState]
    cancel_requested: bool = False
    deadline_at: datetime | None = None
    waiting_on: str | None = None  # e.g. "circuit_open:payments" while a breaker holds it


@dataclass(frozen=True, slots=True)
class SagaError:
    step: str | None
    kind: ErrorKind
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind.value, "message": self.message}


# --- what to do next ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """Make the next attempt of step `index` in `direction`."""

    index: int
    direction: Direction


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Step `index`'s last attempt in `direction` was cut off (its worker died or lost
    the lease) and its policy allows no more: judge it failed with an unknown outcome
    instead of making an attempt beyond the maximum."""

    index: int
    direction: Direction


@dataclass(frozen=True, slots=True)
class BeginCompensation:
    """Stop going forward and unwind, recording `error` on the saga."""

    error: SagaError


@dataclass(frozen=True, slots=True)
class Finish:
    """The saga reaches a terminal status."""

    status: SagaStatus


Next = Call | GiveUp | BeginCompensation | Finish | None


def pivot_passed(spec: DefinitionSpec, saga: SagaState) -> bool:
    """Has the pivot step succeeded? After that the saga can only go forward."""
    return any(
        step_spec.pivot and state.status is StepStatus.SUCCEEDED
        for step_spec, state in zip(spec.steps, saga.steps, strict=True)
    )


def needs_compensation(step_spec: StepSpec, state: StepState) -> bool:
    """Whether unwinding must run this step's compensation (again)."""
    if step_spec.compensation is None:
        return False
    if state.status in (StepStatus.SUCCEEDED, StepStatus.COMPENSATING):
        return True
    # The action may have happened although we never saw it succeed. A step left
    # RUNNING by a crash has maybe_applied set: it is written before every call.
    if state.status in (StepStatus.FAILED, StepStatus.FALLBACK, StepStatus.RUNNING):
        return state.maybe_applied
    return False


def plan(spec: DefinitionSpec, saga: SagaState, now: datetime) -> Next:
    """The next thing to do for a saga that an executor has just claimed."""
    if saga.status is SagaStatus.RUNNING:
        can_unwind = not pivot_passed(spec, saga)
        if can_unwind and saga.cancel_requested:
            return BeginCompensation(SagaError(None, ErrorKind.CANCELLED, "cancelled on request"))
        if can_unwind and saga.deadline_at is not None and now >= saga.deadline_at:
            current = next((s.name for s in saga.steps if s.status not in FORWARD_DONE), None)
            if saga.waiting_on and not saga.waiting_on.startswith("bulkhead"):
                return BeginCompensation(
                    SagaError(
                        current,
                        ErrorKind.CIRCUIT_OPEN,
                        f"deadline passed while waiting: {saga.waiting_on}",
                    )
                )
            return BeginCompensation(
                SagaError(current, ErrorKind.DEADLINE, "the saga's timeout_seconds passed")
            )
        for index, state in enumerate(saga.steps):
            if state.status in (StepStatus.PENDING, StepStatus.RUNNING):
                return _forward(spec, index, state)
            if state.status not in FORWARD_DONE:
                raise ValueError(f"step {state.name} is {state.status} in a running saga")
        return Finish(SagaStatus.COMPLETED)
    if saga.status is SagaStatus.COMPENSATING:
        for index in range(len(saga.steps) - 1, -1, -1):
            state = saga.steps[index]
            if needs_compensation(spec.steps[index], state):
                limit = spec.steps[index].compensation_retry.max_attempts
                if state.status is StepStatus.COMPENSATING and state.compensation_attempts >= limit:
                    return GiveUp(index, Direction.COMPENSATION)
                return Call(index, Direction.COMPENSATION)
        return Finish(SagaStatus.COMPENSATED)
    if saga.status is SagaStatus.COMPLETED:
        # An operator retried a dead-lettered non-critical step of a completed saga.
        for index, state in enumerate(saga.steps):
            if state.status in (StepStatus.PENDING, StepStatus.RUNNING):
                return _forward(spec, index, state)
    return None


def _forward(spec: DefinitionSpec, index: int, state: StepState) -> Call | GiveUp:
    """The next forward attempt, unless the stored attempts already reach the maximum."""
    if (
        state.status is StepStatus.RUNNING
        and state.attempts >= spec.steps[index].retry.max_attempts
    ):
        return GiveUp(index, Direction.ACTION)
    return Call(index, Direction.ACTION)


def cut_off_outcome(attempt: int) -> Outcome:
    """How an attempt that a crash cut off is judged: failed, outcome unknown."""
    return Outcome(
        success=False,
        retryable=False,
        maybe_applied=True,
        error_kind=ErrorKind.CONNECTION,
        message=f"attempt {attempt} was cut off (its worker stopped or lost its lease) "
        "and no attempts are left; outcome unknown",
    )


# --- what an attempt's outcome leads to ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """The writes that follow one attempt, committed together with its outcome."""

    step_status: StepStatus
    saga_status: SagaStatus
    retry_in: float | None = None  # seconds until the next attempt of the same call
    saga_error: SagaError | None = None
    dead_letter: bool = False
    use_fallback: bool = False
    continue_now: bool = False  # the saga has more work due immediately
    maybe_applied: bool = False


def after_attempt(
    spec: DefinitionSpec,
    saga: SagaState,
    call: Call,
    attempt: int,
    outcome: Outcome,
    retry_after: float | None = None,
) -> Transition:
    """Decide the step's and saga's new status after attempt number `attempt` of `call`."""
    step_spec = spec.steps[call.index]
    state = saga.steps[call.index]
    maybe_applied = state.maybe_applied or outcome.maybe_applied
    if call.direction is Direction.COMPENSATION:
        return _after_compensation(step_spec, saga, attempt, outcome, retry_after, maybe_applied)

    # A completed saga only runs steps again on an operator's retry; it stays completed.
    goes_on = SagaStatus.COMPLETED if saga.status is SagaStatus.COMPLETED else SagaStatus.RUNNING
    if outcome.success:
        return Transition(StepStatus.SUCCEEDED, goes_on, continue_now=True, maybe_applied=True)
    decision = decide_retry(step_spec.retry, attempt, outcome.retryable, retry_after)
    if decision.retry:
        return Transition(
            StepStatus.RUNNING,
            goes_on,
            retry_in=decision.delay_seconds,
            maybe_applied=maybe_applied,
        )
    error = SagaError(step_spec.name, outcome.error_kind or ErrorKind.HTTP_STATUS, outcome.message)
    if step_spec.fallback is not None:
        return Transition(
            StepStatus.FALLBACK,
            goes_on,
            use_fallback=True,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    if not step_spec.critical or saga.status is SagaStatus.COMPLETED:
        return Transition(
            StepStatus.FAILED,
            goes_on,
            dead_letter=True,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    if pivot_passed(spec, saga):
        # Past the point of no return: park it for an operator to push forward.
        return Transition(
            StepStatus.FAILED,
            SagaStatus.FAILED,
            saga_error=error,
            dead_letter=True,
            maybe_applied=maybe_applied,
        )
    return Transition(
        StepStatus.FAILED,
        SagaStatus.COMPENSATING,
        saga_error=error,
        continue_now=True,
        maybe_applied=maybe_applied,
    )


def _after_compensation(
    step_spec: StepSpec,
    saga: SagaState,
    attempt: int,
    outcome: Outcome,
    retry_after: float | None,
    maybe_applied: bool,
) -> Transition:
    if outcome.success:
        return Transition(
            StepStatus.COMPENSATED,
            SagaStatus.COMPENSATING,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    decision = decide_retry(step_spec.compensation_retry, attempt, outcome.retryable, retry_after)
    if decision.retry:
        return Transition(
            StepStatus.COMPENSATING,
            SagaStatus.COMPENSATING,
            retry_in=decision.delay_seconds,
            maybe_applied=maybe_applied,
        )
    return Transition(
        StepStatus.COMPENSATION_FAILED,
        SagaStatus.FAILED,
        dead_letter=True,
        maybe_applied=maybe_applied,
        saga_error=None,
    )
