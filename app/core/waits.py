"""Callback steps' waits, as pure decisions like `decide`'s: the attempt a participant
accepted (`202`), whether a wait without a report is over and why, and what ends it.

A waiting step holds no worker, no connection and no bulkhead slot: the saga is released
until the report or the wait's due time, whichever comes first. Its attempt's outcome
is then decided by `decide` (the report, or a timeout), or by `end_wait` (a cancel or
the deadline).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from app.core.callbacks import ACCEPTED
from app.core.commit import (
    BreakerChange,
    Commit,
    Event,
    Next,
    PivotLock,
    SagaError,
    SagaState,
    SagaWrite,
    StepError,
    StepWrite,
)
from app.core.decide import Attempt, breaker_change, pivot_passed
from app.core.definition import DefinitionSpec, StepSpec
from app.core.outcome import CallResult, classify
from app.core.states import AttemptOutcome, Direction, ErrorKind, EventType, SagaStatus, StepStatus


class WaitEnd(StrEnum):
    """Why a callback wait ends without a report."""

    TIMEOUT = "timeout"  # the attempt is a timeout with an unknown outcome (retried)
    CANCELLED = "cancelled"  # the saga unwinds, the waiting step included
    DEADLINE = "deadline"


def accepts(step_spec: StepSpec, direction: Direction, result: CallResult) -> bool:
    """Whether a direct answer accepts the call for a later report (callback steps only)."""
    return (
        step_spec.callback is not None
        and direction is Direction.ACTION
        and result.failure is None
        and result.status_code == ACCEPTED
    )


def accepted(spec: DefinitionSpec, saga: SagaState, attempt: Attempt, now: datetime) -> Commit:
    """A callback step's participant accepted the call: the step waits, holding no worker
    and no bulkhead slot, until the report or its timeout (no later than the deadline
    while the saga can unwind, so that the deadline is noticed on time)."""
    call = attempt.call
    step_spec = spec.steps[call.index]
    assert step_spec.callback is not None
    outcome = classify(attempt.result, step_spec.retry.retry_on_status)
    breaker: BreakerChange | None = breaker_change(attempt, outcome, now)
    left = step_spec.callback.timeout_seconds - attempt.duration_ms / 1000
    until = now + timedelta(seconds=max(0.0, left))
    if saga.deadline_at is not None and _unwindable(spec, saga):
        until = min(until, saga.deadline_at)
    event = Event(
        EventType.ATTEMPT_FINISHED,
        step=step_spec.name,
        direction=call.direction,
        attempt=attempt.number,
        outcome=AttemptOutcome.ACCEPTED,
        status_code=attempt.result.status_code,
        duration_ms=attempt.duration_ms,
    )
    step = StepWrite(
        index=call.index,
        status=StepStatus.WAITING,
        maybe_applied=True,
        finished=False,
        set_result=True,
        status_code=attempt.result.status_code,
        response=attempt.result.body,
    )
    write = SagaWrite(
        saga.status,
        Next.LATER,
        delay_seconds=max(0.0, (until - now).total_seconds()),
        # The pivot's outcome is still open while it waits: a cancel stays refused.
        pivot=PivotLock.LOCK if step_spec.pivot else PivotLock.KEEP,
    )
    return Commit(write, step, (event,), breaker=breaker, release_slot=True)


def _unwindable(spec: DefinitionSpec, saga: SagaState) -> bool:
    """A cancel or the deadline can still unwind the saga."""
    return saga.status is SagaStatus.RUNNING and not pivot_passed(spec, saga)


def wait_over(
    spec: DefinitionSpec, saga: SagaState, due_at: datetime, now: datetime
) -> WaitEnd | None:
    """Whether a callback wait without a report ends now, and why."""
    unwindable = _unwindable(spec, saga)
    if unwindable and saga.cancel_requested:
        return WaitEnd.CANCELLED
    if unwindable and saga.deadline_at is not None and now >= saga.deadline_at:
        return WaitEnd.DEADLINE
    if now >= due_at:
        return WaitEnd.TIMEOUT
    return None


def keep_waiting(spec: DefinitionSpec, saga: SagaState, due_at: datetime, now: datetime) -> Commit:
    """Looked at before its wait is over (no report, no cancel): due again at the wait's
    end, or at the deadline if that comes first."""
    until = due_at
    if saga.deadline_at is not None and _unwindable(spec, saga):
        until = min(until, saga.deadline_at)
    delay = max(0.0, (until - now).total_seconds())
    return Commit(SagaWrite(saga.status, Next.LATER, delay_seconds=delay), crashes_reset=False)


def end_wait(spec: DefinitionSpec, saga: SagaState, index: int, why: WaitEnd) -> Commit:
    """A cancel or the deadline ends a callback wait: the step fails with an unknown
    outcome (its token is closed: a late report is refused) and the saga unwinds, the
    waiting step's compensation included."""
    assert why is not WaitEnd.TIMEOUT, "a timeout is an attempt's outcome: decide() it"
    step_spec = spec.steps[index]
    state = saga.steps[index]
    if why is WaitEnd.CANCELLED:
        kind, message = ErrorKind.CANCELLED, "cancelled while waiting for its callback report"
        error = SagaError(None, ErrorKind.CANCELLED, "cancelled on request")
    else:
        kind, message = ErrorKind.DEADLINE, "the saga's timeout_seconds passed while waiting"
        error = SagaError(step_spec.name, ErrorKind.DEADLINE, "the saga's timeout_seconds passed")
    step = StepWrite(
        index=index,
        status=StepStatus.FAILED,
        maybe_applied=True,
        finished=True,
        last_error=StepError(
            kind, f"{message}; outcome unknown", None, state.attempts, Direction.ACTION
        ),
    )
    events = (
        Event(
            EventType.ATTEMPT_FINISHED,
            step=step_spec.name,
            direction=Direction.ACTION,
            attempt=state.attempts,
            outcome=AttemptOutcome.FAILED,
            error_kind=kind,
            message=f"{message}; outcome unknown",
        ),
        Event(
            EventType.COMPENSATION_STARTED,
            step=error.step,
            error_kind=error.kind,
            message=error.message,
        ),
    )
    write = SagaWrite(
        SagaStatus.COMPENSATING,
        Next.CONTINUE,
        error=error,
        pivot=PivotLock.UNLOCK if step_spec.pivot else PivotLock.KEEP,
    )
    return Commit(write, step, events)
