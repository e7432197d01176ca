"""Saga and step statuses, error kinds, event types, wait reasons, and the legal
transitions between statuses.

The database mirrors each enum with a CHECK constraint. The transition tables are the
rules the decisions follow; the unit tests hold every decision to them, and the state
machine fuzzer holds every change observed in the database to them.
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
    WAITING = "waiting"  # a callback step's participant accepted the call; no report yet
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
    CALLBACK_FAILED = "callback_failed"  # a callback step's participant reported failure
    RESPONSE_TOO_LARGE = "response_too_large"  # a 2xx body over the response cap


class EventType(StrEnum):
    """The kinds of entries in a saga's history."""

    SAGA_STARTED = "saga_started"
    ATTEMPT_STARTED = "attempt_started"
    ATTEMPT_FINISHED = "attempt_finished"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"  # the last allowed attempt was cut off
    FALLBACK_USED = "fallback_used"
    COMPENSATION_STARTED = "compensation_started"
    CANCEL_REQUESTED = "cancel_requested"
    DEAD_LETTER_RETRIED = "dead_letter_retried"
    CALLBACK_REPORTED = "callback_reported"  # a callback step's participant reported
    NOTIFICATION_DELIVERED = "notification_delivered"
    NOTIFICATION_FAILED = "notification_failed"  # its attempts are exhausted: a dead letter
    EXECUTOR_ERROR = "executor_error"
    SAGA_COMPLETED = "saga_completed"
    SAGA_COMPENSATED = "saga_compensated"
    SAGA_FAILED = "saga_failed"

    @classmethod
    def finished(cls, status: SagaStatus) -> EventType:
        """The event that records a saga reaching a terminal status."""
        return _FINISHED[status]


class WaitReason(StrEnum):
    """Why a due saga is not being called."""

    CIRCUIT_OPEN = "circuit_open"
    HALF_OPEN_BUSY = "half_open_probe_in_flight"
    BULKHEAD_FULL = "bulkhead_full"


class SlotKind(StrEnum):
    """A service's slots: its bulkhead's, and its half-open probes'."""

    CALL = "call"
    PROBE = "probe"


class Direction(StrEnum):
    ACTION = "action"
    COMPENSATION = "compensation"
    NOTIFY = "notify"  # a completion notification (dead letters only; no step)


class NotificationStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


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
    ACCEPTED = "accepted"  # a callback step answered 202: it waits for the report
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
        {
            StepStatus.SUCCEEDED,
            StepStatus.FAILED,
            StepStatus.FALLBACK,
            StepStatus.RUNNING,
            StepStatus.WAITING,
        }
    ),
    # A wait ends with the report, or with the timeout (retried, or failed for good).
    StepStatus.WAITING: frozenset(
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


_FINISHED = {
    SagaStatus.COMPLETED: EventType.SAGA_COMPLETED,
    SagaStatus.COMPENSATED: EventType.SAGA_COMPENSATED,
    SagaStatus.FAILED: EventType.SAGA_FAILED,
}


def saga_can_move(src: SagaStatus, dst: SagaStatus) -> bool:
    return dst in SAGA_TRANSITIONS[src]


def step_can_move(src: StepStatus, dst: StepStatus) -> bool:
    return dst in STEP_TRANSITIONS[src]
