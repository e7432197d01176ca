"""The saga repository on PostgreSQL: the engine's port (`app.engine.ports`), applying
the core's `Commit` values with guarded statements (SQL in `engine_sql`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import AsyncRawCursor
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.breaker import Breaker, Passage
from app.core.commit import BreakerChange, Commit, Event, Next, SagaState, StepState, Waiting
from app.core.decide import CRASH_LIMIT
from app.core.definition import DefinitionSpec
from app.core.states import (
    CircuitState,
    Direction,
    ErrorKind,
    EventType,
    SagaStatus,
    SlotKind,
    StepStatus,
    WaitReason,
)
from app.core.views import Pruned
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
from app.store import engine_sql as sql
from app.store.notifications import PgNotifications
from app.store.pool import open_pool
from app.store.registry import Registry, service_spec
from app.store.retention import Retention
from app.store.sagas import NOTIFY_WAKE, SAGA_DONE_CHANNEL, SAGA_WORK_CHANNEL


async def notify(conn: AsyncConnection, channel: str, payload: str) -> None:
    await conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": channel, "p": payload})


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _breaker(row: Any) -> Breaker:
    return Breaker(CircuitState(row.state), row.consecutive_failures, row.opened_at)


# The hot statements, in psycopg's form, run on the repository's own psycopg pool in
# autocommit: each is one round trip and one transaction.
_CLAIM = sql.native_form(sql.CLAIM)
_COMMIT = sql.native_form(sql.COMMIT)
_WHY_NOT_WRITTEN = sql.native_form(sql.WHY_NOT_WRITTEN)
_RENEW = sql.native_form(sql.RENEW)
_START_CALL = sql.native_form(sql.START_CALL)
_START_PLAIN = sql.native_form(sql.START_PLAIN)
_CALLBACK_STATE = sql.native_form(sql.CALLBACK_STATE)
_CLOSE_CALLBACK = sql.native_form(sql.CLOSE_CALLBACK)
_WAKE_IF_REPORTED = sql.native_form(sql.WAKE_IF_REPORTED)


# What "the database cannot be reached now" looks like through either driver.
_OUTAGES = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    OSError,
)


def _event(e: Event) -> dict[str, Any]:
    return {
        "type": e.type.value,
        "step": e.step,
        "direction": e.direction.value if e.direction else None,
        "attempt": e.attempt,
        "outcome": e.outcome.value if e.outcome else None,
        "status_code": e.status_code,
        "error_kind": e.error_kind.value if e.error_kind else None,
        "message": e.message,
        "duration_ms": e.duration_ms,
    }


def _step_state(step: dict[str, Any]) -> StepState:
    return StepState(
        name=step["name"],
        status=StepStatus(step["status"]),
        attempts=step["attempts"],
        compensation_attempts=step["compensation_attempts"],
        maybe_applied=step["maybe_applied"],
        in_flight=step["in_flight"],
        status_code=step["status_code"],
        response=step["response"],
    )


def _step_params(commit: Commit) -> dict[str, Any]:
    step = commit.step
    return {
        "has_step": step is not None,
        "s_idx": step.index if step else 0,
        "s_status": step.status.value if step else None,
        "s_maybe_applied": step.maybe_applied if step else False,
        "s_set_result": step.set_result if step else False,
        "s_status_code": step.status_code if step else None,
        "s_response": _json(step.response) if step else None,
        "s_last_error": _json(step.last_error.as_json()) if step and step.last_error else None,
        "s_keep_error": step.keep_error if step else True,
        "s_finished": step.finished if step else False,
    }


def _letter_params(commit: Commit) -> dict[str, Any]:
    letter = commit.dead_letter
    return {
        "has_letter": letter is not None,
        "dl_id": uuid.uuid4() if letter else None,
        "dl_idx": letter.step_index if letter else None,
        "dl_step": letter.step_name if letter else None,
        "dl_direction": letter.direction.value if letter else None,
        "dl_service": letter.service if letter else None,
        "dl_attempts": letter.attempts if letter else None,
        "dl_last_error": _json(letter.last_error) if letter else None,
        "dl_request": _json(letter.request) if letter else None,
    }


def _breaker_params(change: BreakerChange | None) -> dict[str, Any]:
    return {
        "has_breaker": change is not None,
        "br_service": change.service if change else None,
        "br_state": change.after.state.value if change else None,
        "br_failures": change.after.consecutive_failures if change else None,
        "br_opened_at": change.after.opened_at if change else None,
        "br_was_state": change.before.state.value if change else None,
        "br_was_failures": change.before.consecutive_failures if change else None,
        "br_was_opened_at": change.before.opened_at if change else None,
    }


def _next_params(then: StartAttempt | None) -> dict[str, Any]:
    forward = then is None or then.direction is Direction.ACTION
    return {
        "has_next": then is not None,
        "n_idx": then.index if then else 0,
        "n_status": (StepStatus.RUNNING if forward else StepStatus.COMPENSATING).value,
        "n_forward": forward,
        "n_step": then.step_name if then else None,
        "n_direction": then.direction.value if then else None,
        "n_service": then.service if then else None,
        "n_version": then.version if then else None,
        "n_token_hash": then.callback_hash if then else None,
        "n_callback_timeout": then.callback_timeout if then else None,
    }


class PgSagaRepository(PgNotifications):
    """Every statement the executor runs, for one worker."""

    def __init__(self, engine: AsyncEngine, worker_id: str, lease_seconds: float) -> None:
        self.engine = engine
        self.worker = worker_id
        self.lease = lease_seconds
        self._registry = Registry(engine)
        # Admissions (claims, attempt starts) may queue on a service's gate rows; they
        # get at most half of the pool, so that an outcome commit or a lease renewal
        # never waits for a connection behind them. Without this, fifty sagas retrying a
        # busy half-open gate held every connection while the probe's own outcome waited
        # for one until its lease ran out.
        size = engine.pool.size() if hasattr(engine.pool, "size") else 2
        self._admissions = asyncio.Semaphore(max(1, size // 2 + size % 2))
        self._hot_size = 2 * size
        self._pool: AsyncConnectionPool | None = None
        self._pool_opening = asyncio.Lock()

    async def _hot(self) -> AsyncConnectionPool:
        """The psycopg pool of the hot statements, opened on first use."""
        if self._pool is None:
            async with self._pool_opening:
                if self._pool is None:
                    url = self.engine.url.render_as_string(hide_password=False)
                    # A frozen process must not keep a transaction's locks past its lease.
                    self._pool = await open_pool(
                        url,
                        self._hot_size,
                        idle_in_transaction_seconds=self.lease,
                        name=f"engine-{self.worker}",
                        wait_seconds=self.lease,
                    )
        return self._pool

    async def close(self) -> None:
        """Close the hot pool (the engine is its owner's to dispose of)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _fence(self, lease: Lease) -> dict[str, Any]:
        return {"id": lease.saga_id, "worker": self.worker, "epoch": lease.epoch}

    # --- claiming ---------------------------------------------------------------------

    async def claim(self, limit: int) -> list[Claimed]:
        params = {"worker": self.worker, "lease": self.lease, "limit": limit}
        pool = await self._hot()
        async with (
            self._admissions,
            pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=namedtuple_row) as cur,
        ):
            await cur.execute(_CLAIM.text, _CLAIM.args(params))
            rows: list[Any] = await cur.fetchall()
        return [
            Claimed(
                lease=Lease(r.id, r.lease_epoch),
                definition_id=r.definition_id,
                definition_name=r.definition_name,
                input=r.input,
                request_id=r.request_id,
                traceparent=r.traceparent,
                deadline_at=r.deadline_at,
                db_now=r.db_now,
                state=SagaState(
                    status=SagaStatus(r.status),
                    steps=tuple(_step_state(s) for s in r.steps or ()),
                    cancel_requested=r.cancel_requested,
                    deadline_at=r.deadline_at,
                    waiting=(
                        Waiting(WaitReason(r.waiting_reason), r.waiting_service)
                        if r.waiting_reason
                        else None
                    ),
                    pivot_locked=r.pivot_locked,
                ),
            )
            for r in rows
        ]

    async def _one(self, statement: sql.Native, params: dict[str, Any]) -> Any:
        """Run a hot statement (one autocommit round trip); its first row, or None."""
        return await self._alone(statement.text, statement.args(params))

    async def _alone(self, text: str, args: tuple[Any, ...]) -> Any:
        pool = await self._hot()
        async with (
            pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=namedtuple_row) as cur,
        ):
            await cur.execute(text, args)
            return await cur.fetchone()

    async def renew(self, lease: Lease) -> bool:
        row = await self._one(_RENEW, {**self._fence(lease), "lease": self.lease})
        return bool(row and row.n)

    # --- callback steps ---------------------------------------------------------------

    async def callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        row = await self._one(
            _CALLBACK_STATE, {"id": lease.saga_id, "idx": index, "attempt": attempt}
        )
        if row is None:
            return None
        return CallbackState(row.report, row.closed, row.due_at, row.created_at, row.db_now)

    async def close_callback(self, lease: Lease, index: int, attempt: int) -> CallbackState | None:
        row = await self._one(
            _CLOSE_CALLBACK, {**self._fence(lease), "idx": index, "attempt": attempt}
        )
        if row is not None:
            return CallbackState(None, True, row.due_at, row.created_at, row.db_now)
        # Nothing closed: a report came first, it was closed before, or the lease is gone
        # (then the next owner decides; what is stored says which).
        return await self.callback(lease, index, attempt)

    async def wake_if_reported(self, lease: Lease, index: int, attempt: int) -> bool:
        params = {"id": lease.saga_id, "idx": index, "attempt": attempt}
        return await self._one(_WAKE_IF_REPORTED, params) is not None

    # --- starting an attempt ----------------------------------------------------------

    async def start_attempt(self, lease: Lease, start: StartAttempt) -> Started | Refused | None:
        forward = start.direction is Direction.ACTION
        params = {
            **self._fence(lease),
            "lease": self.lease,
            "status": (StepStatus.RUNNING if forward else StepStatus.COMPENSATING).value,
            "forward": forward,
            "idx": start.index,
            "step": start.step_name,
            "direction": start.direction.value,
            "pivot": start.pivot,
            "token_hash": start.callback_hash,
            "callback_timeout": start.callback_timeout,
        }
        if start.service is not None and start.passage is Passage.PROBE:
            async with self._admissions:
                probed = await self._start_probe(lease, start, params)
            if isinstance(probed, Refused) and probed.reason is Refusal.STALE:
                return replace(probed, service=await self.service(start.service))
            return probed
        statement = _START_PLAIN
        if start.service is not None:
            statement = _START_CALL
            params.update(service=start.service, version=start.version)
        async with self._admissions:
            row = await self._one(statement, params)
        assert row is not None  # the statement always answers one row
        if row.attempt is not None:
            return Started(int(row.attempt), row.db_now)
        if not row.ours:
            return None
        if not row.go:
            return Refused(Refusal.CANCELLED_FIRST, row.db_now)
        if not row.current:
            assert start.service is not None
            return Refused(Refusal.STALE, row.db_now, await self.service(start.service))
        return Refused(Refusal.NO_SLOT, row.db_now)

    async def _start_probe(
        self, lease: Lease, start: StartAttempt, params: dict[str, Any]
    ) -> Started | Refused | None:
        assert start.service is not None
        async with self.engine.begin() as conn:
            fence = (await conn.execute(sql.LOCK_FENCE, self._fence(lease))).first()
            if fence is None:
                return None
            row = (await conn.execute(sql.LOCK_BREAKER, {"service": start.service})).first()
            if row is None:  # the service is gone: the request fails when it is built
                now = (await conn.execute(text("SELECT now()"))).scalar_one()
                await conn.rollback()
                return Refused(Refusal.STALE, now, None)
            if start.pivot and fence.cancel_requested:
                await conn.rollback()
                return Refused(Refusal.CANCELLED_FIRST, row.db_now)
            if int(row.version) != start.version or _breaker(row) != start.breaker:
                await conn.rollback()
                return Refused(Refusal.STALE, row.db_now, None)  # the caller reads it afresh
            after = start.breaker_after
            if after is not None and after != start.breaker:
                await self._write_breaker(conn, BreakerChange(start.service, _breaker(row), after))
            for kind, refusal in (
                (SlotKind.PROBE, Refusal.NO_PROBE_SLOT),
                (SlotKind.CALL, Refusal.NO_SLOT),
            ):
                taken = (
                    await conn.execute(
                        sql.TAKE_SLOT,
                        {**params, "service": start.service, "kind": kind.value},
                    )
                ).first()
                if taken is None:
                    await conn.rollback()
                    return Refused(refusal, row.db_now)
            started = (await conn.execute(sql.START_HELD, params)).first()
            if started is None:
                await conn.rollback()
                return None
        return Started(int(started.attempt), started.db_now)

    # --- committing outcomes ----------------------------------------------------------

    async def commit(
        self, lease: Lease, commit: Commit, was: SagaStatus, then: StartAttempt | None = None
    ) -> Applied | CancelFirst | None:
        """Apply `commit` to a saga this worker holds in status `was`, and start `then`
        with it when its guards hold: one statement."""
        write = commit.saga
        params = {
            **self._fence(lease),
            "lease": self.lease,
            "status": write.status.value,
            "was": was.value,
            "error": _json(write.error.as_json()) if write.error else None,
            "terminal": write.status.terminal,
            "keep": write.next is Next.CONTINUE,
            "idle": write.next is Next.IDLE,
            "delay": max(write.delay_seconds, 0.0),
            "running": write.status is SagaStatus.RUNNING,
            "pivot_lock": write.pivot.value == "lock",
            "pivot": write.pivot.value,
            "waiting_reason": write.waiting.reason.value if write.waiting else None,
            "waiting_service": write.waiting.service if write.waiting else None,
            "crashes_reset": commit.crashes_reset,
            "unless_cancelled": write.unless_cancelled,
            "release": commit.release_slot or write.next is not Next.CONTINUE,
            "channel": SAGA_DONE_CHANNEL,
            "notify": write.status.terminal and write.next is Next.IDLE,
            "becomes_terminal": write.status.terminal and write.status is not was,
            "events": _json([_event(e) for e in commit.events]),
            **_step_params(commit),
            **_letter_params(commit),
            **_breaker_params(commit.breaker),
            **_next_params(then),
        }
        row = await self._one(_COMMIT, params)
        if row is None:
            why = await self._one(_WHY_NOT_WRITTEN, self._fence(lease))
            if why is not None and why.ours and why.cancelled and write.unless_cancelled:
                return CancelFirst(why.db_now)
            return None
        conflict = commit.breaker is not None and not row.breaker_written
        epoch = row.notification_epoch
        return Applied(
            row.db_now,
            bool(row.cancel_requested),
            conflict,
            next_attempt=row.next_attempt,
            notification=int(epoch) if epoch is not None else None,
        )

    async def _write_breaker(self, conn: AsyncConnection, change: BreakerChange) -> bool:
        before, after = change.before, change.after
        row = (
            await conn.execute(
                sql.WRITE_BREAKER,
                {
                    "service": change.service,
                    "state": after.state.value,
                    "failures": after.consecutive_failures,
                    "opened_at": after.opened_at,
                    "was_state": before.state.value,
                    "was_failures": before.consecutive_failures,
                    "was_opened_at": before.opened_at,
                },
            )
        ).first()
        return row is not None

    async def apply_breaker(self, change: BreakerChange) -> Breaker | None:
        async with self.engine.begin() as conn:
            if await self._write_breaker(conn, change):
                return None
            row = (await conn.execute(sql.CURRENT_BREAKER, {"service": change.service})).first()
        return _breaker(row) if row is not None else None

    # --- giving sagas back ------------------------------------------------------------

    async def release(self, lease: Lease, after_seconds: float) -> None:
        """Give a saga back (shutdown): due again for another worker after `after_seconds`.
        A saga whose call was cut off is held back until that call's timeout would have
        passed, so the participant does not see the same key twice at once."""
        async with self.engine.begin() as conn:
            await conn.execute(
                sql.RELEASE, {**self._fence(lease), "idle": False, "after": after_seconds}
            )

    async def idle(self, lease: Lease) -> bool:
        """Nothing is left to do for this saga: no longer due, lease given back."""
        async with self.engine.begin() as conn:
            n = (
                await conn.execute(sql.RELEASE, {**self._fence(lease), "idle": True, "after": 0})
            ).scalar_one()
        return bool(n)

    async def record_crash(self, lease: Lease, error_type: str, park: Park) -> int:
        """An unexpected error of the executor on this saga: count it, give back the lease
        and its bulkhead slot, and look again after a growing pause; at CRASH_LIMIT
        consecutive errors, park the saga `failed` with a dead letter for an operator
        instead of claiming it into the same error again. Returns the count (0: fenced)."""
        message = f"the executor failed on this saga ({error_type})"
        async with self.engine.begin() as conn:
            row = (await conn.execute(sql.RECORD_CRASH, self._fence(lease))).first()
            if row is None:
                return 0
            crashes = int(row.crashes)
            await conn.execute(sql.RELEASE_SLOTS, {"id": lease.saga_id})
            events: list[tuple[EventType, str | None, str | None]] = [
                (EventType.EXECUTOR_ERROR, park.step_name, message)
            ]
            if crashes >= CRASH_LIMIT:
                error = {
                    "step": park.step_name,
                    "kind": ErrorKind.TEMPLATE.value,
                    "message": f"{message} {crashes} times in a row; parked for an operator",
                }
                await conn.execute(sql.PARK, {"id": lease.saga_id, "error": _json(error)})
                # A parked saga takes no report: its waits are closed.
                await conn.execute(sql.CLOSE_CALLBACKS, {"id": lease.saga_id})
                await conn.execute(sql.ARM_NOTIFICATION, {"id": lease.saga_id})
                await notify(conn, SAGA_WORK_CHANNEL, NOTIFY_WAKE)
                await conn.execute(
                    sql.INSERT_DEAD_LETTER,
                    {
                        "dl_id": uuid.uuid4(),
                        "id": lease.saga_id,
                        "idx": park.step_index,
                        "step": park.step_name,
                        "direction": park.direction.value,
                        "service": park.service,
                        "attempts": park.attempts,
                        "last_error": _json({**error, "direction": park.direction.value}),
                        "request": None,
                    },
                )
                events.append((EventType.SAGA_FAILED, None, None))
                await notify(conn, SAGA_DONE_CHANNEL, str(lease.saga_id))
            await conn.execute(
                sql.INSERT_EVENT,
                [
                    {
                        "id": lease.saga_id,
                        "type": kind.value,
                        "step": step,
                        "direction": None,
                        "attempt": None,
                        "outcome": None,
                        "status_code": None,
                        "error_kind": None,
                        "message": text,
                        "duration_ms": None,
                        "worker": self.worker,
                    }
                    for kind, step, text in events
                ],
            )
        return crashes

    # --- reads ------------------------------------------------------------------------

    async def service(self, name: str) -> ServiceView | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sql.SERVICE, {"service": name})).first()
        if row is None:
            return None
        return ServiceView(name, service_spec(row), int(row.version), _breaker(row))

    async def definition(self, definition_id: int) -> DefinitionSpec:
        record = await self._registry.get_definition_by_id(definition_id)
        if record is None:
            raise LookupError(f"definition {definition_id} vanished")
        return record.spec

    def outage(self, error: BaseException) -> bool:
        return isinstance(error, _OUTAGES)

    async def prune_finished(self, older_than_seconds: float) -> Pruned | None:
        return await Retention(self.engine).prune(older_than_seconds)

    async def prune_idempotency_keys(self, batch: int = 1000) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(sql.PRUNE_KEYS, {"n": batch})
        return int(getattr(result, "rowcount", 0) or 0)
