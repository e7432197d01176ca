"""An in-memory saga repository and a fake clock, for fast unit tests of the whole
executor loop (claim → start → call → decide → commit) without a database.

It keeps the repository port's rules (`app.engine.ports`) the way the PostgreSQL one
does: fenced writes by (owner, epoch), the status a decision was made on, a completion
that yields to a cancel that can still unwind, the pivot lock, bulkhead and probe slots
held under the lease, breaker compare-and-set. Times come from the fake clock, which
plays the database's clock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from app.core.breaker import Breaker, Passage
from app.core.commit import BreakerChange, Commit, Next, PivotLock, SagaState, StepState
from app.core.definition import DefinitionSpec, ServiceSpec
from app.core.states import CircuitState, Direction, EventType, SagaStatus, StepStatus
from app.engine.ports import (
    Applied,
    CallbackState,
    CancelFirst,
    Claimed,
    Lease,
    Park,
    Refusal,
    Refused,
    ServiceView,
    StartAttempt,
    Started,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """The database's clock, moved by the test."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Row:
    """One saga, as the sagas and saga_steps tables would hold it."""

    id: uuid.UUID
    definition_id: int
    state: SagaState
    input: Any = None
    deadline_at: datetime | None = None
    due_at: datetime | None = None
    owner: str | None = None
    epoch: int = 0
    lease_until: datetime | None = None
    error: dict[str, Any] | None = None
    crashes: int = 0
    events: list[tuple[EventType, str | None, Any]] = field(default_factory=list)


@dataclass
class Token:
    """A callback attempt's token row (callback_tokens)."""

    hash: str
    due_at: datetime
    created_at: datetime
    report: dict[str, Any] | None = None
    closed: bool = False


@dataclass
class Slot:
    saga: uuid.UUID | None = None
    epoch: int | None = None
    until: datetime | None = None


class MemoryRepository:
    """The repository port in memory, shared by any number of `Executor`s."""

    def __init__(self, clock: FakeClock, lease_seconds: float = 10.0) -> None:
        self.closed = False
        self.clock = clock
        self.lease = timedelta(seconds=lease_seconds)
        self.worker = "w1"
        self.rows: dict[uuid.UUID, Row] = {}
        self.definitions: dict[int, DefinitionSpec] = {}
        self.services: dict[str, tuple[ServiceSpec, int]] = {}
        self.breakers: dict[str, Breaker] = {}
        self.slots: dict[tuple[str, str], list[Slot]] = {}
        self.dead_letters: list[tuple[uuid.UUID, str, Direction]] = []
        self.tokens: dict[tuple[uuid.UUID, int, int], Token] = {}

    def for_worker(self, worker: str) -> MemoryRepository:
        """A view of the same data as another worker sees it (its own lease owner)."""
        other = object.__new__(MemoryRepository)
        other.__dict__.update(self.__dict__)
        other.worker = worker
        return other

    # --- setting the scene ----------------------------------------------------------

    def add_service(self, name: str, spec: ServiceSpec) -> None:
        version = self.services.get(name, (spec, 0))[1] + 1
        self.services[name] = (spec, version)
        self.breakers.setdefault(name, Breaker(CircuitState.CLOSED, 0, None))
        self.slots[(name, "call")] = [Slot() for _ in range(spec.max_concurrency)]
        self.slots[(name, "probe")] = [
            Slot() for _ in range(spec.circuit_breaker.half_open_max_calls)
        ]

    def start(self, spec: DefinitionSpec, input: Any = None) -> uuid.UUID:
        definition_id = len(self.definitions) + 1
        self.definitions[definition_id] = spec
        saga_id = uuid.uuid4()
        deadline = (
            self.clock.now + timedelta(seconds=spec.timeout_seconds)
            if spec.timeout_seconds
            else None
        )
        state = SagaState(
            SagaStatus.RUNNING,
            tuple(StepState(s.name, StepStatus.PENDING) for s in spec.steps),
            deadline_at=deadline,
        )
        self.rows[saga_id] = Row(
            saga_id, definition_id, state, input, deadline, due_at=self.clock.now
        )
        self.rows[saga_id].events.append((EventType.SAGA_STARTED, None, None))
        return saga_id

    def cancel(self, saga_id: uuid.UUID) -> bool:
        """The cancel use case's statement: refused once the pivot is locked."""
        row = self.rows[saga_id]
        if row.state.status.terminal or row.state.pivot_locked:
            return False
        row.state = replace(row.state, cancel_requested=True)
        if row.owner is None or (row.lease_until and row.lease_until < self.clock.now):
            row.due_at = self.clock.now
        return True

    def next_due(self) -> datetime | None:
        due = [r.due_at for r in self.rows.values() if r.due_at is not None]
        return min(due) if due else None

    def types(self, saga_id: uuid.UUID) -> list[EventType]:
        return [kind for kind, _step, _detail in self.rows[saga_id].events]

    # --- the port -------------------------------------------------------------------

    def _mine(self, lease: Lease) -> Row | None:
        row = self.rows.get(lease.saga_id)
        if row is None or row.owner != self.worker or row.epoch != lease.epoch:
            return None
        return row

    async def claim(self, limit: int) -> list[Claimed]:
        now = self.clock.now
        due = sorted(
            (
                r
                for r in self.rows.values()
                if r.due_at is not None
                and r.due_at <= now
                and r.state.status
                in (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.COMPLETED)
            ),
            key=lambda r: r.due_at or now,
        )[:limit]
        claimed = []
        for row in due:
            row.owner, row.epoch = self.worker, row.epoch + 1
            row.lease_until = row.due_at = now + self.lease
            claimed.append(
                Claimed(
                    Lease(row.id, row.epoch),
                    row.definition_id,
                    "flow",
                    row.input,
                    None,
                    None,
                    row.deadline_at,
                    row.state,
                    now,
                )
            )
        return claimed

    async def start_attempt(self, lease: Lease, start: StartAttempt) -> Started | Refused | None:
        now = self.clock.now
        row = self._mine(lease)
        if row is None:
            return None
        if start.pivot and row.state.cancel_requested:
            return Refused(Refusal.CANCELLED_FIRST, now)
        taken: list[Slot] = []
        if start.service is not None:
            _spec, version = self.services[start.service]
            breaker = self.breakers[start.service]
            if version != start.version or breaker != start.breaker:
                return Refused(Refusal.STALE, now, await self.service(start.service))
            kinds = ["call"] if start.passage is Passage.CALL else ["probe", "call"]
            for kind in kinds:
                free = [s for s in self.slots[(start.service, kind)] if _free(s, now)]
                if not free:
                    for slot in taken:
                        slot.saga = slot.epoch = slot.until = None
                    reason = Refusal.NO_SLOT if kind == "call" else Refusal.NO_PROBE_SLOT
                    return Refused(reason, now)
                free[0].saga, free[0].epoch, free[0].until = row.id, lease.epoch, now + self.lease
                taken.append(free[0])
            if start.breaker_after is not None and start.breaker_after != breaker:
                self.breakers[start.service] = start.breaker_after
        forward = start.direction is Direction.ACTION
        old = row.state.steps[start.index]
        if forward:
            step = replace(old, status=StepStatus.RUNNING, attempts=old.attempts + 1)
            number = step.attempts
        else:
            step = replace(
                old,
                status=StepStatus.COMPENSATING,
                compensation_attempts=old.compensation_attempts + 1,
            )
            number = step.compensation_attempts
        step = replace(step, in_flight=True)
        row.state = replace(
            row.state.with_step(start.index, step),
            waiting=None,
            pivot_locked=row.state.pivot_locked or start.pivot,
        )
        row.lease_until = row.due_at = now + self.lease
        row.events.append((EventType.ATTEMPT_STARTED, start.step_name, number))
        if start.callback_hash is not None:
            assert start.callback_timeout is not None
            due = now + timedelta(seconds=start.callback_timeout)
            self.tokens[(row.id, start.index, number)] = Token(start.callback_hash, due, now)
        return Started(number, now)

    def report(self, token_hash: str, report: dict[str, Any]) -> str:
        """The report route's transaction: taken / repeated / different / closed / unknown."""
        for (saga_id, _index, _attempt), token in self.tokens.items():
            if token.hash != token_hash:
                continue
            if token.report is None and not token.closed:
                token.report = report
                row = self.rows[saga_id]
                if row.owner is None and row.due_at is not None:
                    row.due_at = self.clock.now
                return "taken"
            if token.report == report:
                return "repeated"
            return "different" if token.report is not None else "closed"
        return "unknown"

    async def callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        token = self.tokens.get((lease.saga_id, index, attempt))
        if token is None:
            return None
        return CallbackState(
            token.report, token.closed, token.due_at, token.created_at, self.clock.now
        )

    async def close_callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        token = self.tokens.get((lease.saga_id, index, attempt))
        if token is not None and self._mine(lease) and token.report is None:
            token.closed = True
        return await self.callback(lease, index, attempt)

    async def wake_if_reported(self, lease: Lease, index: int, attempt: int) -> bool:
        token = self.tokens.get((lease.saga_id, index, attempt))
        row = self.rows[lease.saga_id]
        if token is not None and token.report is not None and row.owner is None:
            row.due_at = self.clock.now
            return True
        return False

    async def commit(
        self, lease: Lease, commit: Commit, was: SagaStatus, then: StartAttempt | None = None
    ) -> Applied | CancelFirst | None:
        now = self.clock.now
        row = self._mine(lease)
        if row is None or row.state.status is not was:
            return None
        write = commit.saga
        if write.unless_cancelled and row.state.cancel_requested and not row.state.pivot_locked:
            return CancelFirst(now)
        state = row.state
        if commit.step is not None:
            sw = commit.step
            step = replace(
                state.steps[sw.index],
                status=sw.status,
                maybe_applied=sw.maybe_applied,
                in_flight=False,
            )
            if sw.set_result:
                step = replace(step, status_code=sw.status_code, response=sw.response)
            state = state.with_step(sw.index, step)
        pivot = state.pivot_locked
        if write.pivot is PivotLock.LOCK:
            pivot = True
        elif write.pivot is PivotLock.UNLOCK:
            pivot = False
        row.state = replace(state, status=write.status, waiting=write.waiting, pivot_locked=pivot)
        if write.error is not None:
            row.error = write.error.as_json()
        if write.next is Next.CONTINUE:
            row.lease_until = row.due_at = now + self.lease
        else:
            row.owner = row.lease_until = None
            if write.next is Next.IDLE:
                row.due_at = None
            elif row.state.cancel_requested and write.status is SagaStatus.RUNNING and not pivot:
                row.due_at = now
            else:
                row.due_at = now + timedelta(seconds=write.delay_seconds)
        if commit.crashes_reset:
            row.crashes = 0
        row.events.extend((e.type, e.step, e.outcome or e.message) for e in commit.events)
        if commit.dead_letter is not None:
            key = (row.id, commit.dead_letter.step_name, commit.dead_letter.direction)
            if key not in self.dead_letters:
                self.dead_letters.append(key)
        if commit.release_slot or write.next is not Next.CONTINUE:
            self._release(row.id)
        conflict = False
        if commit.breaker is not None:
            conflict = await self.apply_breaker(commit.breaker) is not None
        next_attempt = None
        unwinding = row.state.cancel_requested and not row.state.pivot_locked
        past = row.deadline_at is not None and now >= row.deadline_at
        if then is not None and write.next is Next.CONTINUE and not unwinding and not past:
            started = await self.start_attempt(lease, then)
            next_attempt = started.attempt if isinstance(started, Started) else None
        return Applied(now, row.state.cancel_requested, conflict, next_attempt)

    def _release(self, saga_id: uuid.UUID) -> None:
        for slots in self.slots.values():
            for slot in slots:
                if slot.saga == saga_id:
                    slot.saga = slot.epoch = slot.until = None

    async def apply_breaker(self, change: BreakerChange) -> Breaker | None:
        current = self.breakers[change.service]
        if current != change.before:
            return current
        self.breakers[change.service] = change.after
        return None

    async def renew(self, lease: Lease) -> bool:
        row = self._mine(lease)
        if row is None:
            return False
        row.lease_until = row.due_at = self.clock.now + self.lease
        return True

    async def release(self, lease: Lease, after_seconds: float) -> None:
        row = self._mine(lease)
        if row is not None:
            row.owner = row.lease_until = None
            row.due_at = self.clock.now + timedelta(seconds=after_seconds)
            self._release(row.id)

    async def idle(self, lease: Lease) -> bool:
        row = self._mine(lease)
        if row is None:
            return False
        row.owner = row.lease_until = row.due_at = None
        self._release(row.id)
        return True

    async def record_crash(self, lease: Lease, error_type: str, park: Park) -> int:
        row = self._mine(lease)
        if row is None:
            return 0
        row.crashes += 1
        row.owner = row.lease_until = None
        row.due_at = self.clock.now + timedelta(seconds=min(60, 2 ** (row.crashes - 1)))
        self._release(row.id)
        row.events.append((EventType.EXECUTOR_ERROR, park.step_name, error_type))
        if row.crashes >= 3:
            row.due_at = None
            if row.state.status is not SagaStatus.COMPLETED:
                row.state = replace(row.state, status=SagaStatus.FAILED)
            self.dead_letters.append((row.id, park.step_name, park.direction))
        return row.crashes

    async def service(self, name: str) -> ServiceView | None:
        if name not in self.services:
            return None
        spec, version = self.services[name]
        return ServiceView(name, spec, version, self.breakers[name])

    async def definition(self, definition_id: int) -> DefinitionSpec:
        return self.definitions[definition_id]

    async def prune_idempotency_keys(self) -> int:
        return 0

    async def close(self) -> None:
        self.closed = True

    async def prune_finished(self, older_than_seconds: float) -> None:
        return None

    def outage(self, error: BaseException) -> bool:
        return False

    def live_slots(self, service: str, kind: str = "call") -> int:
        return sum(not _free(s, self.clock.now) for s in self.slots[(service, kind)])


def _free(slot: Slot, now: datetime) -> bool:
    return slot.saga is None or slot.until is None or slot.until < now
