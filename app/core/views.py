"""Read models: what the stores answer and the use cases pass on, as plain values."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from app.core.definition import DefinitionSpec, ServiceSpec
from app.core.states import (
    CircuitState,
    DeadLetterStatus,
    Direction,
    NotificationStatus,
    SagaStatus,
    StepStatus,
)


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    name: str
    spec: ServiceSpec
    created_at: datetime
    updated_at: datetime
    circuit_state: CircuitState
    consecutive_failures: int
    opened_at: datetime | None
    in_flight: int
    version: int = 1


@dataclass(frozen=True, slots=True)
class DefinitionRecord:
    id: int
    name: str
    version: int
    content_hash: str
    spec: DefinitionSpec
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StepView:
    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    status_code: int | None
    response: Any
    last_error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None
    maybe_applied: bool = False
    in_flight: bool = False
    callback_due_at: datetime | None = None  # a waiting callback step: when its wait ends


@dataclass(frozen=True, slots=True)
class NotificationView:
    """A saga's completion notification, as its view shows it."""

    status: NotificationStatus
    attempts: int


@dataclass(frozen=True, slots=True)
class SagaView:
    id: uuid.UUID
    definition: str
    definition_version: int
    definition_id: int
    status: SagaStatus
    input: Any
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: dict[str, Any] | None
    deadline_at: datetime | None
    cancel_requested: bool
    steps: list[StepView]
    business_key: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    notification: NotificationView | None = None  # None: the saga has no notify target


@dataclass(frozen=True, slots=True)
class StepSummary:
    """A step in a list: everything but its response (that is in the saga's own view)."""

    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    status_code: int | None
    last_error: dict[str, Any] | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class SagaSummary:
    """A saga in a list: no input and no step responses, so that a page costs what its
    rows cost, not what participants answered (up to 1 MiB per step)."""

    id: uuid.UUID
    definition: str
    definition_version: int
    status: SagaStatus
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: dict[str, Any] | None
    deadline_at: datetime | None
    cancel_requested: bool
    steps: list[StepSummary]
    business_key: str | None
    labels: dict[str, str]


class StartResult(Enum):
    CREATED = "created"
    REPLAYED = "replayed"
    MISMATCH = "mismatch"
    BUSY = "busy"  # exclusive definition: another non-terminal saga holds the business key
    STALE = "stale"  # a newer version of the definition exists than the one asked to start


@dataclass(frozen=True, slots=True)
class NewSaga:
    definition: DefinitionRecord
    input: Any
    idempotency_key: str | None
    fingerprint: str | None
    key_ttl_seconds: float
    request_id: str | None = None
    traceparent: str | None = None
    business_key: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    notify: dict[str, Any] | None = None  # the effective NotifySpec document
    latest: bool = False  # `definition` is the latest version as last known: checked at start


class CancelResult(Enum):
    ACCEPTED = "accepted"
    NOT_FOUND = "not_found"
    TERMINAL = "terminal"
    PAST_PIVOT = "past_pivot"  # the pivot's call is in flight or has succeeded


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    id: uuid.UUID
    saga_id: uuid.UUID
    definition: str
    step: str | None  # None for a notification's dead letter (direction notify)
    step_idx: int | None
    direction: Direction
    service: str | None
    attempts: int
    last_error: dict[str, Any] | None
    request: dict[str, Any] | None
    status: DeadLetterStatus
    reason: str | None
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None


class ActionResult(Enum):
    DONE = "done"
    ALREADY = "already"  # the same action was taken before: idempotent success
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class SagaDocument:
    """A saga's view as the API answers it, and what the API needs to know of it."""

    id: uuid.UUID
    definition: str
    status: SagaStatus
    body: bytes
    db_now: datetime | None = None
    deadline_at: datetime | None = None  # known when the document comes from the start
    traceparent: str | None = None
    first_attempt: bool = False  # the start also started the first step's first attempt


@dataclass(frozen=True, slots=True)
class FirstAttempt:
    """The first step's first attempt, started by the statement that creates the saga
    when its guards hold: for a `service`, still at `version` with its breaker closed and
    a bulkhead slot free (None: a URL call, no guard). `prepared` is the executor's own
    record of it, handed back when it adopts the saga."""

    step_name: str
    service: str | None = None
    version: int | None = None
    prepared: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Handoff:
    """The executor of this process takes a new saga over at once (no claim needed)."""

    worker: str
    lease_seconds: float
    first: FirstAttempt | None = None


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one retention pass deleted (or, dry, would delete), by table."""

    sagas: int = 0
    saga_steps: int = 0
    saga_events: int = 0
    idempotency_keys: int = 0
    dead_letters: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        mine, theirs = self.counts(), other.counts()
        return Pruned(**{name: mine[name] + theirs[name] for name in mine})

    def counts(self) -> dict[str, int]:
        """Table name -> rows."""
        return {name: getattr(self, name) for name in self.__slots__}


class ReportOutcome(Enum):
    """What became of a callback report."""

    TAKEN = "taken"
    REPEATED = "repeated"  # the very report was taken before: idempotent success
    DIFFERENT = "different"  # another report was taken for this attempt
    CLOSED = "closed"  # the attempt's wait is over (timed out, or the saga moved on)
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Reported:
    outcome: ReportOutcome
    saga_id: uuid.UUID | None = None
    step: str | None = None
    attempt: int | None = None
