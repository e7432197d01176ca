"""What an operator's dead-letter actions may do, decided on plain values.

A retry runs the parked step or compensation again with fresh attempts and the same
key: a compensation resumes a `failed` saga's unwinding; a step after the pivot resumes
a `failed` saga going forward; a non-critical step of a `completed` saga runs again while
the saga stays completed; a notification (direction `notify`) is delivered again. Everything
else is refused with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.core.states import DeadLetterStatus, Direction, SagaStatus, StepStatus


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """How a retry resets the step and the saga."""

    step_status: StepStatus  # pending (forward) or compensating
    reset_attempts: bool  # forward attempts back to 0 (else compensation attempts)
    saga_status: SagaStatus
    keep_finished: bool  # a completed saga stays finished
    clear_error: bool  # a saga going forward again carries no error


@dataclass(frozen=True, slots=True)
class Refusal:
    already: bool  # the same action was taken before: idempotent success
    message: str


def plan_retry(
    letter_status: DeadLetterStatus,
    direction: Direction,
    step_name: str,
    saga_status: SagaStatus,
    saga_error_step: str | None,
    saga_busy: bool,
) -> RetryPlan | Refusal:
    if letter_status is DeadLetterStatus.RETRIED:
        return Refusal(True, "already retried")
    if letter_status is DeadLetterStatus.DISCARDED:
        return Refusal(False, "the dead letter was discarded")
    if direction is Direction.COMPENSATION:
        if saga_status is not SagaStatus.FAILED:
            return Refusal(False, f"the saga is {saga_status.value}, not failed")
        return RetryPlan(StepStatus.COMPENSATING, False, SagaStatus.COMPENSATING, False, False)
    if saga_status not in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        return Refusal(
            False,
            f"the saga is {saga_status.value}; only a completed or failed saga's step can "
            "be retried",
        )
    if saga_status is SagaStatus.FAILED and saga_error_step != step_name:
        return Refusal(False, "the saga failed at another step; retry that dead letter first")
    if saga_busy:
        return Refusal(False, "the saga is being worked on; retry shortly")
    completed = saga_status is SagaStatus.COMPLETED
    return RetryPlan(
        StepStatus.PENDING,
        True,
        SagaStatus.COMPLETED if completed else SagaStatus.RUNNING,
        keep_finished=completed,
        clear_error=not completed,
    )


def plan_notify_retry(letter_status: DeadLetterStatus, saga_status: SagaStatus) -> Refusal | None:
    """None: a notification's dead letter may be retried: the notification is due again
    at once with fresh attempts and the same key (the saga's status is not touched)."""
    if letter_status is DeadLetterStatus.RETRIED:
        return Refusal(True, "already retried")
    if letter_status is DeadLetterStatus.DISCARDED:
        return Refusal(False, "the dead letter was discarded")
    if not saga_status.terminal:
        return Refusal(
            False,
            f"the saga is {saga_status.value}; its notification is armed again when it ends",
        )
    return None


def plan_discard(letter_status: DeadLetterStatus) -> Refusal | None:
    """None: the dead letter may be discarded."""
    if letter_status is DeadLetterStatus.DISCARDED:
        return Refusal(True, "already discarded")
    if letter_status is DeadLetterStatus.RETRIED:
        return Refusal(False, "the dead letter was already retried")
    return None
