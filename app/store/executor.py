"""The executor's queries: claim due sagas, record attempts, commit outcomes.

Every write is fenced by (lease_owner, lease_epoch): a worker whose lease expired
and was taken over gets no row back and must stop. Times come from the database
clock, never from the process. A lease is extended from `clock_timestamp()`, the
moment the statement runs, not from `now()`, the start of its transaction: a
transaction that first waited on a lock (the breaker row) would otherwise commit a
lease that is already expired, and the saga would be claimed again, by this very
worker even, while its call is in flight.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.domain.definition import ServiceSpec
from app.domain.states import (
    AttemptOutcome,
    CircuitState,
    Direction,
    ErrorKind,
    SagaStatus,
    StepStatus,
)
from app.resilience.breaker import Admission, Breaker, WaitReason
from app.store.registry import service_spec
from app.store.sagas import SAGA_DONE_CHANNEL

_CLAIM = text(
    """
    UPDATE sagas AS s
       SET lease_owner = :worker,
           lease_epoch = s.lease_epoch + 1,
           lease_expires_at = now() + make_interval(secs => :lease),
           due_at = now() + make_interval(secs => :lease)
      FROM (SELECT id FROM sagas
             WHERE due_at <= now() AND status IN ('running', 'compensating', 'completed')
             ORDER BY due_at
             LIMIT :limit
             FOR UPDATE SKIP LOCKED) AS due
     WHERE s.id = due.id
    RETURNING s.id, s.lease_epoch
    """
)

_LOAD_SAGA = text(
    """
    SELECT id, definition_id, definition_name, status, input, idempotency_key, deadline_at,
           cancel_requested, request_id, traceparent, lease_owner, lease_epoch, waiting_on,
           now() AS db_now
      FROM sagas WHERE id = :id
    """
)

_LOAD_STEPS = text(
    """
    SELECT idx, name, status, attempts, compensation_attempts, maybe_applied, status_code,
           response
      FROM saga_steps WHERE saga_id = :id ORDER BY idx
    """
)

_RENEW = text(
    """
    UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                     due_at = clock_timestamp() + make_interval(secs => :lease)
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
    RETURNING id
    """
)

# Reading the breaker and counting live calls are separate statements on purpose: a
# statement that waits for the row lock keeps the snapshot it started with, so counts
# taken in it would miss the calls admitted by the transactions it waited for.
_READ_BREAKER = text(
    """
    SELECT cb.state, cb.consecutive_failures, cb.opened_at, s.version, now() AS db_now
      FROM circuit_breakers AS cb JOIN services AS s ON s.name = cb.service
     WHERE cb.service = :service
    """
)
_LOCK_BREAKER = text(
    """
    SELECT cb.state, cb.consecutive_failures, cb.opened_at, s.version, now() AS db_now
      FROM circuit_breakers AS cb JOIN services AS s ON s.name = cb.service
     WHERE cb.service = :service
       FOR UPDATE OF cb
    """
)
_SERVICE_ROW = text("SELECT * FROM services WHERE name = :service")
_COUNT_LIVE = text(
    """
    SELECT count(*) AS live_calls, count(*) FILTER (WHERE inflight_probe) AS live_probes
      FROM sagas
     WHERE inflight_service = :service AND lease_expires_at > now() AND id <> :id
    """
)

_WRITE_BREAKER = text(
    """
    UPDATE circuit_breakers SET state = :state, consecutive_failures = :failures,
                                opened_at = :opened_at, updated_at = now()
     WHERE service = :service
    """
)

_WAIT = text(
    """
    UPDATE sagas SET due_at = :due, lease_owner = NULL, lease_expires_at = NULL,
                     inflight_service = NULL, inflight_probe = false, waiting_on = :reason
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
    RETURNING id
    """
)

_START_ATTEMPT = text(
    """
    WITH fenced AS (
      UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                       due_at = clock_timestamp() + make_interval(secs => :lease),
                       updated_at = now(),
                       inflight_service = :service,
                       inflight_probe = :probe,
                       waiting_on = NULL,
                       pivot_locked = pivot_locked OR :pivot
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
         -- the pivot never starts once a cancel was accepted (see request_cancel)
         AND NOT (:pivot AND cancel_requested)
      RETURNING id
    )
    UPDATE saga_steps AS st
       SET status = :status,
           attempts = st.attempts + CASE WHEN :forward THEN 1 ELSE 0 END,
           compensation_attempts = st.compensation_attempts + CASE WHEN :forward THEN 0 ELSE 1 END,
           maybe_applied = st.maybe_applied OR :forward,
           started_at = coalesce(st.started_at, now())
      FROM fenced
     WHERE st.saga_id = fenced.id AND st.idx = :idx
    RETURNING CASE WHEN :forward THEN st.attempts ELSE st.compensation_attempts END AS attempt
    """
)

_FINISH_SAGA_ROW = text(
    """
    UPDATE sagas
       SET status = :status,
           error = coalesce(CAST(:error AS jsonb), error),
           updated_at = now(),
           finished_at = CASE WHEN :terminal THEN coalesce(finished_at, now()) ELSE NULL END,
           due_at = CASE WHEN :keep THEN clock_timestamp() + make_interval(secs => :lease)
                         WHEN :idle THEN NULL
                         -- a cancel that can still unwind does not wait for a backoff
                         WHEN cancel_requested AND :running
                              AND NOT (pivot_locked OR :pivot_done) THEN now()
                         ELSE now() + make_interval(secs => :delay) END,
           lease_owner = CASE WHEN :keep THEN lease_owner ELSE NULL END,
           lease_expires_at = CASE WHEN :keep
                                   THEN clock_timestamp() + make_interval(secs => :lease)
                                   ELSE NULL END,
           inflight_service = NULL,
           inflight_probe = false,
           waiting_on = :waiting_on,
           pivot_locked = CASE WHEN :pivot_outcome THEN :pivot_done ELSE pivot_locked END,
           crashes = 0
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
    RETURNING cancel_requested, now() AS db_now
    """
)

_UPDATE_STEP = text(
    """
    UPDATE saga_steps
       SET status = :status,
           maybe_applied = :maybe_applied,
           status_code = CASE WHEN :forward THEN CAST(:status_code AS integer) ELSE status_code END,
           response = CASE WHEN :forward THEN CAST(:response AS jsonb) ELSE response END,
           last_error = CASE WHEN :keep_error THEN last_error
                             ELSE CAST(:last_error AS jsonb) END,
           finished_at = CASE WHEN :done THEN now() ELSE finished_at END
     WHERE saga_id = :id AND idx = :idx
    """
)

_INSERT_EVENT = text(
    """
    INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, status_code,
                             error_kind, message, duration_ms, worker)
    VALUES (:id, :type, :step, :direction, :attempt, :outcome, :status_code,
            :error_kind, :message, :duration_ms, :worker)
    """
)

_CLOSE_ABANDONED = text(
    """
    INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, message, worker)
    SELECT s.saga_id, 'attempt_finished', s.step, s.direction, s.attempt, 'abandoned',
           'the worker died or lost its lease during this attempt; outcome unknown',
           :worker
      FROM saga_events AS s
     WHERE s.saga_id = :id AND s.type = 'attempt_started'
       AND EXISTS (SELECT 1 FROM sagas WHERE id = :id AND lease_owner = :worker
                   AND lease_epoch = :epoch)
       AND NOT EXISTS (SELECT 1 FROM saga_events AS f
                        WHERE f.saga_id = s.saga_id AND f.type = 'attempt_finished'
                          AND f.step = s.step AND f.direction = s.direction
                          AND f.attempt = s.attempt)
    """
)

_INSERT_DEAD_LETTER = text(
    """
    INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                              service, attempts, last_error, request)
    SELECT :dl_id, id, definition_name, :idx, :step, :direction, :service, :attempts,
           CAST(:last_error AS jsonb), CAST(:request AS jsonb)
      FROM sagas WHERE id = :id
    ON CONFLICT (saga_id, step_idx, direction) WHERE status = 'open' DO NOTHING
    """
)


@dataclass(slots=True)
class StepRow:
    idx: int
    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    maybe_applied: bool
    status_code: int | None
    response: Any


@dataclass(slots=True)
class SagaWork:
    """A claimed saga, as the executor holds it in memory between commits."""

    id: uuid.UUID
    epoch: int
    definition_id: int
    definition_name: str
    status: SagaStatus
    input: Any
    idempotency_key: str | None
    deadline_at: datetime | None
    cancel_requested: bool
    request_id: str | None
    traceparent: str | None
    db_now: datetime
    waiting_on: str | None = None
    steps: list[StepRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EventRecord:
    type: str
    step: str | None = None
    direction: Direction | None = None
    attempt: int | None = None
    outcome: AttemptOutcome | None = None
    status_code: int | None = None
    error_kind: ErrorKind | None = None
    message: str | None = None
    duration_ms: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    step_idx: int
    step_name: str
    direction: Direction
    service: str | None
    attempts: int
    last_error: dict[str, Any] | None
    request: dict[str, Any] | None


CRASH_LIMIT = 3


@dataclass(frozen=True, slots=True)
class ParkRecord:
    """Where a saga that keeps failing the executor is parked: its current step."""

    step_idx: int
    step_name: str
    direction: Direction
    service: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class StepWrite:
    idx: int
    status: StepStatus
    forward: bool
    maybe_applied: bool
    status_code: int | None
    response: Any
    last_error: dict[str, Any] | None
    keep_error: bool  # a successful compensation keeps the action's error visible
    done: bool


class Next(StrEnum):
    """What follows a commit."""

    CONTINUE = "continue"  # this worker goes straight on with the saga (keeps the lease)
    LATER = "later"  # released; due again after `delay_seconds`
    IDLE = "idle"  # released; nothing is due (terminal)


@dataclass(frozen=True, slots=True)
class SagaWrite:
    """The saga row after a commit: status, and when it is next due."""

    status: SagaStatus
    next: Next
    error: dict[str, Any] | None = None
    delay_seconds: float = 0.0
    waiting_on: str | None = None


@dataclass(frozen=True, slots=True)
class Gate:
    """Breaker and bulkhead admission for a call to `service`, decided under its row lock.

    `spec` is the executor's copy of the service at `version`; when the database holds
    a newer version, the store reads it and decides with that one instead.
    """

    service: str
    spec: ServiceSpec
    version: int
    decide: Callable[[ServiceSpec, Breaker, datetime, int, int], Admission]
    latest_due: datetime | None = None  # wake no later than this (the saga's deadline)


@dataclass(frozen=True, slots=True)
class Started:
    """The attempt is recorded as started; `service` is the service as it is now (its
    version may be newer than the executor's copy)."""

    attempt: int
    service: ServiceSpec | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class CancelledFirst:
    """The pivot did not start: a cancel was accepted before it could."""


@dataclass(frozen=True, slots=True)
class Denied:
    """The call was not made: the saga waits until `retry_at`, no attempt spent."""

    reason: WaitReason
    retry_at: datetime


@dataclass(frozen=True, slots=True)
class BreakerUpdate:
    """After a call: the new breaker state, computed from the locked current one."""

    service: str
    apply: Callable[[Breaker, datetime], Breaker]


class PivotOutcome(StrEnum):
    """How an attempt of the pivot step ended, for the saga's pivot lock."""

    SUCCEEDED = "succeeded"  # locked for good: the saga only goes forward
    NOT_YET = "not_yet"  # failed (retry or final): a cancel may unwind again


@dataclass(frozen=True, slots=True)
class Committed:
    cancel_requested: bool
    db_now: datetime
    status: SagaStatus  # as written: a completion may yield to a cancel (see commit)
    next: Next


def _json(value: Any) -> str | None:
    import json

    return None if value is None else json.dumps(value, separators=(",", ":"))


class ExecutorStore:
    """Every statement the executor runs."""

    def __init__(self, engine: AsyncEngine, worker_id: str, lease_seconds: float) -> None:
        self.engine = engine
        self.worker = worker_id
        self.lease = lease_seconds

    async def claim(self, limit: int) -> list[tuple[uuid.UUID, int]]:
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                _CLAIM, {"worker": self.worker, "lease": self.lease, "limit": limit}
            )
            return [(r.id, r.lease_epoch) for r in rows]

    async def load(self, saga_id: uuid.UUID, epoch: int) -> SagaWork | None:
        """The saga and its steps, or None when this worker no longer holds it."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(_LOAD_SAGA, {"id": saga_id})).first()
            if row is None or row.lease_owner != self.worker or row.lease_epoch != epoch:
                return None
            steps = (await conn.execute(_LOAD_STEPS, {"id": saga_id})).all()
        return SagaWork(
            id=row.id,
            epoch=epoch,
            definition_id=row.definition_id,
            definition_name=row.definition_name,
            status=SagaStatus(row.status),
            input=row.input,
            idempotency_key=row.idempotency_key,
            deadline_at=row.deadline_at,
            cancel_requested=row.cancel_requested,
            request_id=row.request_id,
            traceparent=row.traceparent,
            db_now=row.db_now,
            waiting_on=row.waiting_on,
            steps=[
                StepRow(
                    idx=s.idx,
                    name=s.name,
                    status=StepStatus(s.status),
                    attempts=s.attempts,
                    compensation_attempts=s.compensation_attempts,
                    maybe_applied=s.maybe_applied,
                    status_code=s.status_code,
                    response=s.response,
                )
                for s in steps
            ],
        )

    async def renew(self, saga_id: uuid.UUID, epoch: int) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    _RENEW,
                    {"id": saga_id, "worker": self.worker, "epoch": epoch, "lease": self.lease},
                )
            ).first()
        return row is not None

    async def start_attempt(
        self,
        work: SagaWork,
        idx: int,
        direction: Direction,
        step_name: str,
        gate: Gate | None = None,
        pivot: bool = False,
    ) -> Started | Denied | CancelledFirst | None:
        """Record an attempt as started, before the call.

        `Denied` when the service's breaker or bulkhead turns the call away (the saga is
        rescheduled, no attempt spent); `CancelledFirst` when this is the pivot and a
        cancel was accepted before it (nothing written); None if fenced out.
        """
        forward = direction is Direction.ACTION
        status = StepStatus.RUNNING if forward else StepStatus.COMPENSATING
        async with self.engine.begin() as conn:
            probe = False
            fresh: tuple[ServiceSpec, int] | None = None
            if gate is not None:
                admission, fresh = await self._admit(conn, work, gate)
                if not admission.admitted:
                    assert admission.wait is not None and admission.retry_at is not None
                    due = admission.retry_at
                    if gate.latest_due is not None:
                        due = min(due, gate.latest_due)
                    waited = (
                        await conn.execute(
                            _WAIT,
                            {
                                "id": work.id,
                                "worker": self.worker,
                                "epoch": work.epoch,
                                "due": due,
                                "reason": f"{admission.wait.value}:{gate.service}",
                            },
                        )
                    ).first()
                    if waited is None:
                        await conn.rollback()
                        return None
                    return Denied(admission.wait, due)
                probe = admission.probe
            row = (
                await conn.execute(
                    _START_ATTEMPT,
                    {
                        "id": work.id,
                        "worker": self.worker,
                        "epoch": work.epoch,
                        "lease": self.lease,
                        "status": status.value,
                        "forward": forward,
                        "idx": idx,
                        "service": gate.service if gate else None,
                        "probe": probe,
                        "pivot": pivot,
                    },
                )
            ).first()
            if row is None:
                await conn.rollback()
                return CancelledFirst() if pivot and await self._cancelled(work) else None
            attempt = int(row.attempt)
            await self._event(
                conn,
                work.id,
                EventRecord(
                    type="attempt_started",
                    step=step_name,
                    direction=direction,
                    attempt=attempt,
                    outcome=AttemptOutcome.STARTED,
                ),
            )
        if fresh is not None:
            return Started(attempt, *fresh)
        return Started(attempt, gate.spec if gate else None, gate.version if gate else None)

    async def _cancelled(self, work: SagaWork) -> bool:
        """Still ours, with a cancel accepted?"""
        async with self.engine.connect() as conn:
            flag = (
                await conn.execute(
                    text(
                        "SELECT cancel_requested FROM sagas WHERE id = :id "
                        "AND lease_owner = :worker AND lease_epoch = :epoch"
                    ),
                    {"id": work.id, "worker": self.worker, "epoch": work.epoch},
                )
            ).scalar_one_or_none()
        return bool(flag)

    async def commit(
        self,
        work: SagaWork,
        saga: SagaWrite,
        step: StepWrite | None = None,
        events: tuple[EventRecord, ...] = (),
        dead_letter: DeadLetterRecord | None = None,
        breaker: BreakerUpdate | None = None,
        cancellable: bool = False,
        pivot: PivotOutcome | None = None,
    ) -> Committed | None:
        """Commit an outcome and everything it leads to in one transaction.

        None means the lease was lost: nothing was written. With `cancellable`, a
        completion yields to a cancel that was accepted meanwhile and can still unwind
        (no pivot locked): the saga stays `running` and the worker compensates it.
        `pivot` says this commit ends an attempt of the pivot step (and how).
        """
        async with self.engine.begin() as conn:
            if cancellable and saga.status is SagaStatus.COMPLETED:
                # Lock the row first: a cancel either committed before (we see its flag)
                # or waits and then finds the saga completed (409).
                flag = (
                    await conn.execute(
                        text(
                            "SELECT cancel_requested AND NOT pivot_locked FROM sagas "
                            "WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch "
                            "FOR UPDATE"
                        ),
                        {"id": work.id, "worker": self.worker, "epoch": work.epoch},
                    )
                ).scalar_one_or_none()
                if flag is None:
                    await conn.rollback()
                    return None
                if flag:
                    saga = SagaWrite(SagaStatus.RUNNING, Next.CONTINUE)
                    events = tuple(e for e in events if e.type != "saga_completed")
            terminal = saga.status.terminal
            if breaker is not None:
                # Most outcomes change nothing (a success on a closed circuit): read first,
                # and take the row lock only to write, deciding again under it.
                current = await self._breaker(conn, breaker.service, lock=False)
                if current is not None and breaker.apply(*current[:2]) != current[0]:
                    current = await self._breaker(conn, breaker.service, lock=True)
                    assert current is not None
                    updated = breaker.apply(*current[:2])
                    if updated != current[0]:
                        await self._write_breaker(conn, breaker.service, updated)
            row = (
                await conn.execute(
                    _FINISH_SAGA_ROW,
                    {
                        "id": work.id,
                        "worker": self.worker,
                        "epoch": work.epoch,
                        "status": saga.status.value,
                        "error": _json(saga.error),
                        "terminal": terminal,
                        "keep": saga.next is Next.CONTINUE,
                        "idle": saga.next is Next.IDLE,
                        "lease": self.lease,
                        "delay": max(saga.delay_seconds, 0.0),
                        "waiting_on": saga.waiting_on,
                        "running": saga.status is SagaStatus.RUNNING,
                        "pivot_outcome": pivot is not None,
                        "pivot_done": pivot is PivotOutcome.SUCCEEDED,
                    },
                )
            ).first()
            if row is None:
                await conn.rollback()
                return None
            if step is not None:
                await conn.execute(
                    _UPDATE_STEP,
                    {
                        "id": work.id,
                        "idx": step.idx,
                        "status": step.status.value,
                        "forward": step.forward,
                        "maybe_applied": step.maybe_applied,
                        "status_code": step.status_code,
                        "response": _json(step.response),
                        "last_error": _json(step.last_error),
                        "keep_error": step.keep_error,
                        "done": step.done,
                    },
                )
            for event in events:
                await self._event(conn, work.id, event)
            if dead_letter is not None:
                await conn.execute(
                    _INSERT_DEAD_LETTER,
                    {
                        "dl_id": uuid.uuid4(),
                        "id": work.id,
                        "idx": dead_letter.step_idx,
                        "step": dead_letter.step_name,
                        "direction": dead_letter.direction.value,
                        "service": dead_letter.service,
                        "attempts": dead_letter.attempts,
                        "last_error": _json(dead_letter.last_error),
                        "request": _json(dead_letter.request),
                    },
                )
            if terminal and saga.next is Next.IDLE:
                await conn.execute(
                    text("SELECT pg_notify(:c, :id)"), {"c": SAGA_DONE_CHANNEL, "id": str(work.id)}
                )
        return Committed(
            cancel_requested=bool(row.cancel_requested),
            db_now=row.db_now,
            status=saga.status,
            next=saga.next,
        )

    async def _breaker(
        self, conn: AsyncConnection, service: str, lock: bool
    ) -> tuple[Breaker, datetime, int] | None:
        """The breaker, the database time and the service's current version."""
        statement = _LOCK_BREAKER if lock else _READ_BREAKER
        row = (await conn.execute(statement, {"service": service})).first()
        if row is None:
            return None
        breaker = Breaker(CircuitState(row.state), row.consecutive_failures, row.opened_at)
        return breaker, row.db_now, int(row.version)

    async def _live(
        self, conn: AsyncConnection, saga_id: uuid.UUID, service: str
    ) -> tuple[int, int]:
        row = (await conn.execute(_COUNT_LIVE, {"service": service, "id": saga_id})).one()
        return int(row.live_calls), int(row.live_probes)

    async def _write_breaker(self, conn: AsyncConnection, service: str, breaker: Breaker) -> None:
        await conn.execute(
            _WRITE_BREAKER,
            {
                "service": service,
                "state": breaker.state.value,
                "failures": breaker.consecutive_failures,
                "opened_at": breaker.opened_at,
            },
        )

    async def _admit(
        self, conn: AsyncConnection, work: SagaWork, gate: Gate
    ) -> tuple[Admission, tuple[ServiceSpec, int] | None]:
        """Admission, and the service as stored when it is newer than the gate's copy."""
        # First without the lock: sagas that must wait anyway (circuit open, bulkhead
        # full) are turned away without queueing on the service's breaker row.
        current = await self._breaker(conn, gate.service, lock=False)
        if current is None:  # no breaker row (service deleted): let the call fail on its own
            return Admission(True, Breaker(CircuitState.CLOSED, 0, None)), None
        snapshot, db_now, version = current
        spec, fresh = gate.spec, None
        if version != gate.version:
            row = (await conn.execute(_SERVICE_ROW, {"service": gate.service})).first()
            if row is not None:
                spec = service_spec(row)
                fresh = (spec, int(row.version))
        live = await self._live(conn, work.id, gate.service)
        admission = gate.decide(spec, snapshot, db_now, *live)
        if not admission.admitted and admission.breaker == snapshot:
            return admission, fresh
        # It may go: decide again under the lock, with counts read after acquiring it.
        current = await self._breaker(conn, gate.service, lock=True)
        assert current is not None
        snapshot, db_now, _version = current
        admission = gate.decide(
            spec, snapshot, db_now, *await self._live(conn, work.id, gate.service)
        )
        if admission.breaker != snapshot:
            await self._write_breaker(conn, gate.service, admission.breaker)
        return admission, fresh

    async def release(self, saga_id: uuid.UUID, epoch: int, after_seconds: float = 0.0) -> None:
        """Give a saga back (shutdown): due again for another worker after `after_seconds`.

        A saga whose call was cut off is held back until that call's timeout would
        have passed, so the participant does not see the same key twice at once.
        """
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    UPDATE sagas SET lease_owner = NULL, lease_expires_at = NULL,
                                     due_at = now() + make_interval(secs => :after),
                                     inflight_service = NULL, inflight_probe = false
                     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
                    """
                ),
                {"id": saga_id, "worker": self.worker, "epoch": epoch, "after": after_seconds},
            )

    async def idle(self, work: SagaWork) -> bool:
        """Nothing is left to do for this saga: no longer due, lease given back."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        """
                        UPDATE sagas SET due_at = NULL, lease_owner = NULL,
                                         lease_expires_at = NULL, inflight_service = NULL,
                                         inflight_probe = false
                         WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
                        RETURNING id
                        """
                    ),
                    {"id": work.id, "worker": self.worker, "epoch": work.epoch},
                )
            ).first()
        return row is not None

    async def record_crash(self, work: SagaWork, error_type: str, park: ParkRecord) -> int:
        """An unexpected error of the executor on this saga: count it, give back the lease
        and its bulkhead slot, and look again after a growing pause; at CRASH_LIMIT
        consecutive errors, park the saga `failed` with a dead letter for an operator
        instead of claiming it into the same error again. Returns the count (0: fenced)."""
        message = f"the executor failed on this saga ({error_type})"
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        """
                        UPDATE sagas SET crashes = crashes + 1, lease_owner = NULL,
                               lease_expires_at = NULL, inflight_service = NULL,
                               inflight_probe = false, updated_at = now(),
                               due_at = now() + make_interval(secs => least(60, 2 ^ crashes))
                         WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
                        RETURNING crashes
                        """
                    ),
                    {"id": work.id, "worker": self.worker, "epoch": work.epoch},
                )
            ).first()
            if row is None:
                return 0
            crashes = int(row.crashes)
            await self._event(
                conn, work.id, EventRecord("executor_error", step=park.step_name, message=message)
            )
            if crashes >= CRASH_LIMIT:
                error = {"step": park.step_name, "kind": ErrorKind.TEMPLATE.value}
                error["message"] = f"{message} {crashes} times in a row; parked for an operator"
                await conn.execute(
                    text(
                        """
                        UPDATE sagas SET due_at = NULL,
                               status = CASE WHEN status = 'completed' THEN status
                                             ELSE 'failed' END,
                               error = CASE WHEN status = 'completed' THEN error
                                            ELSE CAST(:error AS jsonb) END,
                               finished_at = coalesce(finished_at, now())
                         WHERE id = :id
                        """
                    ),
                    {"id": work.id, "error": _json(error)},
                )
                await conn.execute(
                    _INSERT_DEAD_LETTER,
                    {
                        "dl_id": uuid.uuid4(),
                        "id": work.id,
                        "idx": park.step_idx,
                        "step": park.step_name,
                        "direction": park.direction.value,
                        "service": park.service,
                        "attempts": park.attempts,
                        "last_error": _json({**error, "direction": park.direction.value}),
                        "request": None,
                    },
                )
                await self._event(conn, work.id, EventRecord("saga_failed"))
                await conn.execute(
                    text("SELECT pg_notify(:c, :id)"), {"c": SAGA_DONE_CHANNEL, "id": str(work.id)}
                )
        return crashes

    async def close_abandoned(self, work: SagaWork) -> int:
        """Give attempts that a dead or stopped worker left open an `abandoned` outcome.

        Runs once after a claim, fenced by the new lease, so the history shows an
        outcome for every attempt that was started.
        """
        async with self.engine.begin() as conn:
            result = await conn.execute(
                _CLOSE_ABANDONED,
                {
                    "id": work.id,
                    "worker": self.worker,
                    "epoch": work.epoch,
                },
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def prune_idempotency_keys(self, batch: int = 1000) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    """
                    DELETE FROM idempotency_keys WHERE key IN (
                      SELECT key FROM idempotency_keys WHERE expires_at < now() LIMIT :n)
                    """
                ),
                {"n": batch},
            )
        return int(getattr(result, "rowcount", 0) or 0)

    async def _event(self, conn: AsyncConnection, saga_id: uuid.UUID, event: EventRecord) -> None:
        await conn.execute(
            _INSERT_EVENT,
            {
                "id": saga_id,
                "type": event.type,
                "step": event.step,
                "direction": event.direction.value if event.direction else None,
                "attempt": event.attempt,
                "outcome": event.outcome.value if event.outcome else None,
                "status_code": event.status_code,
                "error_kind": event.error_kind.value if event.error_kind else None,
                "message": event.message,
                "duration_ms": event.duration_ms,
                "worker": self.worker,
            },
        )
