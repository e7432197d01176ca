"""What the engine needs from the outside, as Protocols: the saga repository, the
participant caller and the clock. `main.py` wires PostgreSQL, aiohttp and the real clock
in; the unit tests run the whole executor loop on an in-memory repository, a scripted
caller and a fake clock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from app.core.breaker import Breaker, Passage
from app.core.commit import BreakerChange, Commit, SagaState
from app.core.definition import DefinitionSpec, NotifySpec, ServiceSpec
from app.core.outcome import CallResult
from app.core.requests import HttpRequest
from app.core.states import Direction, EventType, NotificationStatus, SagaStatus
from app.core.views import Pruned


@dataclass(frozen=True, slots=True)
class Lease:
    """A saga this worker holds: every write is fenced by (owner, epoch)."""

    saga_id: uuid.UUID
    epoch: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed saga, with everything the executor needs to drive it."""

    lease: Lease
    definition_id: int
    definition_name: str
    input: Any
    request_id: str | None
    traceparent: str | None
    deadline_at: datetime | None
    state: SagaState
    db_now: datetime


@dataclass(frozen=True, slots=True)
class ServiceView:
    """A service as stored now: its document, its version, its breaker."""

    name: str
    spec: ServiceSpec
    version: int
    breaker: Breaker


@dataclass(frozen=True, slots=True)
class StartAttempt:
    """Record an attempt as started, before its call. With a `service`, the start also
    takes a bulkhead slot (and for a `PROBE` a probe slot too), and happens only if the
    service is still at `version` and its breaker still `breaker` (for a probe, the
    breaker may move from open to half-open with this start)."""

    index: int
    direction: Direction
    step_name: str
    pivot: bool = False
    service: str | None = None
    version: int | None = None
    passage: Passage | None = None
    breaker: Breaker | None = None  # as the gate saw it
    breaker_after: Breaker | None = None  # for a probe that opens the half-open round
    # A callback step's action: its token's hash, stored with the start, and how long the
    # attempt may wait for the report.
    callback_hash: str | None = None
    callback_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Started:
    attempt: int
    db_now: datetime


class Refusal(StrEnum):
    NO_SLOT = "no_slot"  # the bulkhead is full
    NO_PROBE_SLOT = "no_probe_slot"  # the half-open probes are all out
    STALE = "stale"  # the service or its breaker moved: decide again on `service`
    CANCELLED_FIRST = "cancelled_first"  # the pivot may not start: a cancel came first


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal
    db_now: datetime
    service: ServiceView | None = None  # for STALE: the service as it is now


@dataclass(frozen=True, slots=True)
class Applied:
    """The commit landed."""

    db_now: datetime
    cancel_requested: bool
    breaker_conflict: bool = False  # its breaker change lost a race: decide it again
    next_attempt: int | None = None  # the attempt `then` started with it (None: not started)
    # The saga became terminal and its completion notification is armed, held by this
    # worker under this epoch: deliver it now.
    notification: int | None = None


@dataclass(frozen=True, slots=True)
class CancelFirst:
    """A completion that had to yield: a cancel was accepted meanwhile that can still
    unwind. Nothing was written; decide again knowing of the cancel."""

    db_now: datetime


@dataclass(frozen=True, slots=True)
class CallbackState:
    """A callback attempt's token as stored: the report taken (None: none), whether the
    wait was closed without one, and when the wait is due to end."""

    report: dict[str, Any] | None
    closed: bool
    due_at: datetime
    started_at: datetime
    db_now: datetime


@dataclass(frozen=True, slots=True)
class Park:
    """Where a saga that keeps failing the executor is parked: the step it was on."""

    step_index: int
    step_name: str
    direction: Direction
    service: str | None
    attempts: int


class SagaRepository(Protocol):
    """Every read and write the executor makes. None from a write: the lease was lost."""

    async def claim(self, limit: int) -> list[Claimed]: ...

    async def start_attempt(
        self, lease: Lease, start: StartAttempt
    ) -> Started | Refused | None: ...

    async def commit(
        self, lease: Lease, commit: Commit, was: SagaStatus, then: StartAttempt | None = None
    ) -> Applied | CancelFirst | None:
        """Apply `commit` to a saga held in status `was` (the status it was decided on);
        with `then` (a plain call, or a service call through a closed breaker), start
        that attempt in the same transaction if its guards hold (`Applied.next_attempt`)."""
        ...

    async def apply_breaker(self, change: BreakerChange) -> Breaker | None:
        """Compare-and-set alone; None when applied, else the breaker as it is now."""
        ...

    async def renew(self, lease: Lease) -> bool: ...

    async def callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        """The token of a callback attempt (None: the attempt has none)."""
        ...

    async def close_callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        """End the attempt's wait unless a report came first; the token as it is then."""
        ...

    async def wake_if_reported(self, lease: Lease, index: int, attempt: int) -> bool:
        """After the commit that made the step wait: due now if its report is already in."""
        ...

    async def release(self, lease: Lease, after_seconds: float) -> None: ...

    async def idle(self, lease: Lease) -> bool:
        """Nothing is left to do: no longer due, lease and slots given back."""
        ...

    async def record_crash(self, lease: Lease, error_type: str, park: Park) -> int: ...

    async def service(self, name: str) -> ServiceView | None: ...

    async def definition(self, definition_id: int) -> DefinitionSpec: ...

    async def prune_idempotency_keys(self) -> int: ...

    async def close(self) -> None:
        """Give back what the repository holds (its connections); the executor stopped."""
        ...

    async def prune_finished(self, older_than_seconds: float) -> Pruned | None:
        """Delete sagas finished more than `older_than_seconds` ago (retention), in small
        batches; None when another process is doing it now."""
        ...

    def outage(self, error: BaseException) -> bool:
        """Whether an error means the store cannot be reached now (the lease will expire
        and another claim redoes the work), as opposed to a bug or bad data."""
        ...


class Caller(Protocol):
    """Makes participant calls; never raises for what a participant does."""

    async def call(self, request: HttpRequest, send_by: float | None = None) -> CallResult: ...

    async def aclose(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...


# --- completion notifications -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotificationJob:
    """A pending notification this worker holds (until `due_at` passes again): its
    writes are fenced by `epoch`, which every claim (and every re-arm) moves on."""

    saga_id: uuid.UUID
    epoch: int
    attempts: int  # made so far
    saga_status: SagaStatus  # the terminal status being notified
    notify: NotifySpec
    db_now: datetime


class NotifyRefusal(StrEnum):
    FENCED = "fenced"  # another worker claimed it, or it was re-armed or settled
    STALE = "stale"  # the service or its breaker moved: look again
    NO_SLOT = "no_slot"  # the bulkhead (or the half-open probes) is full


@dataclass(frozen=True, slots=True)
class NotifyStart:
    """Count an attempt (and, with a `service`, take a bulkhead slot, and a probe slot
    too for a `PROBE`, only if the service is still at `version` with `breaker`)."""

    service: str | None = None
    version: int | None = None
    passage: Passage | None = None
    breaker: Breaker | None = None
    breaker_after: Breaker | None = None  # a probe moves open to half-open


@dataclass(frozen=True, slots=True)
class NotifyStarted:
    attempt: int
    db_now: datetime


@dataclass(frozen=True, slots=True)
class NotifyFinish:
    """What an attempt wrote: the notification's new state, an event, a dead letter."""

    attempt: int
    status: NotificationStatus
    delay_seconds: float
    error: dict[str, Any] | None
    event: EventType | None
    status_code: int | None
    dead_letter: bool
    service: str | None
    request: dict[str, Any] | None  # redacted, for the dead letter


class Notifications(Protocol):
    """The executor's reads and writes of completion notifications."""

    async def claim_notifications(self, limit: int) -> list[NotificationJob]: ...

    async def held_notification(self, saga_id: uuid.UUID, epoch: int) -> NotificationJob | None:
        """The notification the terminal commit armed under `epoch`, if still so."""
        ...

    async def saga_view(self, saga_id: uuid.UUID) -> bytes | None:
        """The body of `GET /v1/sagas/{id}`."""
        ...

    async def start_notification(
        self, job: NotificationJob, start: NotifyStart
    ) -> NotifyStarted | NotifyRefusal: ...

    async def renew_notification(self, job: NotificationJob) -> bool: ...

    async def postpone_notification(self, job: NotificationJob, delay_seconds: float) -> bool:
        """Not attempted now (an open breaker, a full bulkhead): due again later."""
        ...

    async def finish_notification(self, job: NotificationJob, finish: NotifyFinish) -> bool: ...
