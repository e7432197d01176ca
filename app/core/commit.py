"""What one decision leads to, as plain immutable values the store applies.

A `Commit` holds every write an outcome causes: the saga's new status and schedule, the
step's new state, the events, a dead letter, the breaker change and the bulkhead slot
to give back. The engine carries it to the store, which applies it with guarded
statements (fenced by the lease; a completion guarded against a cancel that can still
unwind); nothing is changed in memory and undone later. `apply` gives the state the
executor holds after a commit landed, from the same value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from app.core.breaker import Breaker
from app.core.states import (
    AttemptOutcome,
    Direction,
    ErrorKind,
    EventType,
    SagaStatus,
    StepStatus,
    WaitReason,
)


class Next(StrEnum):
    """What follows a commit."""

    CONTINUE = "continue"  # this worker goes straight on with the saga (keeps the lease)
    LATER = "later"  # released; due again after `delay_seconds`
    IDLE = "idle"  # released; nothing is due (terminal, or waiting for nobody)


class PivotLock(StrEnum):
    """The saga's pivot lock: set while the pivot's call is in flight and once it
    succeeded; a cancel is refused while it is set."""

    KEEP = "keep"
    LOCK = "lock"
    UNLOCK = "unlock"


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why a due saga is not being called: a breaker or a bulkhead of one service."""

    reason: WaitReason
    service: str


@dataclass(frozen=True, slots=True)
class SagaError:
    step: str | None
    kind: ErrorKind
    message: str

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind.value, "message": self.message}


@dataclass(frozen=True, slots=True)
class StepError:
    """A step's `last_error`."""

    kind: ErrorKind | None
    message: str
    status_code: int | None
    attempt: int
    direction: Direction

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value if self.kind else None,
            "message": self.message,
            "status_code": self.status_code,
            "attempt": self.attempt,
            "direction": self.direction.value,
        }


@dataclass(frozen=True, slots=True)
class SagaWrite:
    status: SagaStatus
    next: Next
    delay_seconds: float = 0.0
    error: SagaError | None = None  # None keeps the saga's error as it is
    waiting: Waiting | None = None
    pivot: PivotLock = PivotLock.KEEP
    # A completion from `running`: it must yield to a cancel accepted meanwhile that can
    # still unwind (no pivot locked); then nothing is written and the engine decides
    # again knowing of the cancel.
    unless_cancelled: bool = False


@dataclass(frozen=True, slots=True)
class StepWrite:
    index: int
    status: StepStatus
    maybe_applied: bool
    finished: bool  # forward work or its compensation on this step is over
    set_result: bool = False  # write `status_code` and `response` (forward attempts)
    status_code: int | None = None
    response: Any = None
    last_error: StepError | None = None
    keep_error: bool = False  # a successful compensation keeps the action's error visible


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    step: str | None = None
    direction: Direction | None = None
    attempt: int | None = None
    outcome: AttemptOutcome | None = None
    status_code: int | None = None
    error_kind: ErrorKind | None = None
    message: str | None = None
    duration_ms: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    step_index: int
    step_name: str
    direction: Direction
    service: str | None
    attempts: int
    last_error: dict[str, Any] | None
    request: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """Compare-and-set: the service's breaker goes from `before` to `after`, only if it
    is still `before` (else the engine decides again on what it is now)."""

    service: str
    before: Breaker
    after: Breaker


@dataclass(frozen=True, slots=True)
class Commit:
    saga: SagaWrite
    step: StepWrite | None = None
    events: tuple[Event, ...] = ()
    dead_letter: DeadLetter | None = None
    breaker: BreakerChange | None = None
    release_slot: bool = False  # the bulkhead slot the attempt held is given back
    crashes_reset: bool = True  # progress: the run of executor errors on this saga ends


@dataclass(frozen=True, slots=True)
class StepState:
    """A step as the decisions see it."""

    name: str
    status: StepStatus
    attempts: int = 0
    compensation_attempts: int = 0
    maybe_applied: bool = False  # some settled attempt may have applied the action
    in_flight: bool = False  # an attempt started and its outcome is not recorded
    status_code: int | None = None
    response: Any = None


@dataclass(frozen=True, slots=True)
class SagaState:
    """A saga as the decisions see it."""

    status: SagaStatus
    steps: tuple[StepState, ...]
    cancel_requested: bool = False
    deadline_at: Any = None  # datetime | None (Any: tests build states tersely)
    waiting: Waiting | None = None
    pivot_locked: bool = False

    def with_step(self, index: int, step: StepState) -> SagaState:
        steps = list(self.steps)
        steps[index] = step
        return replace(self, steps=tuple(steps))


def apply(state: SagaState, commit: Commit) -> SagaState:
    """The saga after `commit` landed: exactly what the store wrote."""
    if commit.step is not None:
        write = commit.step
        old = state.steps[write.index]
        step = replace(old, status=write.status, maybe_applied=write.maybe_applied, in_flight=False)
        if write.set_result:
            step = replace(step, status_code=write.status_code, response=write.response)
        state = state.with_step(write.index, step)
    pivot_locked = state.pivot_locked
    if commit.saga.pivot is PivotLock.LOCK:
        pivot_locked = True
    elif commit.saga.pivot is PivotLock.UNLOCK:
        pivot_locked = False
    return replace(
        state, status=commit.saga.status, waiting=commit.saga.waiting, pivot_locked=pivot_locked
    )


def started(state: SagaState, index: int, direction: Direction, attempt: int) -> SagaState:
    """The saga once an attempt's start is recorded: the step's call is in flight."""
    old = state.steps[index]
    if direction is Direction.ACTION:
        step = replace(old, status=StepStatus.RUNNING, attempts=attempt, in_flight=True)
    else:
        step = replace(
            old, status=StepStatus.COMPENSATING, compensation_attempts=attempt, in_flight=True
        )
    return replace(state.with_step(index, step), waiting=None)
