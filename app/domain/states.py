"""Saga and step statuses, error kinds, and the legal transitions between statuses.

The database mirrors each enum with a CHECK constraint; the store guards every
status change in the statement itself, and these tables say which changes exist.
"""

from __future__ import annotations

from enum import StrEnum


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_SAGA


TERMINAL_SAGA = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    FALLBACK = "fallback"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


class ErrorKind(StrEnum):
    HTTP_STATUS = "http_status"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    CIRCUIT_OPEN = "circuit_open"
    TEMPLATE = "template"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"  # the participant's address is not allowed (SSRF guard)
    RESPONSE_TOO_LARGE = "response_too_large"  # a 2xx body over the response cap


class Direction(StrEnum):
    ACTION = "action"
    COMPENSATION = "compensation"


class DeadLetterStatus(StrEnum):
    OPEN = "open"
    RETRIED = "retried"
    DISCARDED = "discarded"


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class AttemptOutcome(StrEnum):
    """How one attempt ended, as recorded in the event history."""

    STARTED = "started"  # written before the call; replaced by the outcome after it
    SUCCEEDED = "succeeded"
    RETRYABLE = "retryable"  # failed, another attempt will follow
    FAILED = "failed"  # failed for good
    ABANDONED = "abandoned"  # the process died or lost its lease mid-call


SAGA_TRANSITIONS: dict[SagaStatus, frozenset[SagaStatus]] = {
    SagaStatus.RUNNING: frozenset(
        {SagaStatus.COMPLETED, SagaStatus.COMPENSATING, SagaStatus.FAILED}
    ),
    SagaStatus.COMPENSATING: frozenset({SagaStatus.COMPENSATED, SagaStatus.FAILED}),
    # An operator's dead-letter retry resumes a failed saga where it stopped.
    SagaStatus.FAILED: frozenset({SagaStatus.RUNNING, SagaStatus.COMPENSATING}),
    SagaStatus.COMPLETED: frozenset(),
    SagaStatus.COMPENSATED: frozenset(),
}

STEP_TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset({StepStatus.RUNNING, StepStatus.FAILED}),
    StepStatus.RUNNING: frozenset(
        {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.FALLBACK, StepStatus.RUNNING}
    ),
    StepStatus.SUCCEEDED: frozenset({StepStatus.COMPENSATING}),
    # A failed step is compensated when its outcome is unknown, or retried by an operator.
    StepStatus.FAILED: frozenset({StepStatus.COMPENSATING, StepStatus.RUNNING}),
    StepStatus.FALLBACK: frozenset({StepStatus.COMPENSATING}),
    StepStatus.COMPENSATING: frozenset(
        {StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED, StepStatus.COMPENSATING}
    ),
    StepStatus.COMPENSATED: frozenset(),
    StepStatus.COMPENSATION_FAILED: frozenset({StepStatus.COMPENSATING}),
}


def saga_can_move(src: SagaStatus, dst: SagaStatus) -> bool:
    return dst in SAGA_TRANSITIONS[src]


def step_can_move(src: StepStatus, dst: StepStatus) -> bool:
    return dst in STEP_TRANSITIONS[src]
