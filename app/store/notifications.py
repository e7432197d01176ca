"""Completion notifications on PostgreSQL: the executor's `Notifications` port.

A notification row is armed by the commit that makes its saga terminal (`engine_sql.
COMMIT`), held for a lease by the worker that made that commit, and otherwise claimed
by any executor once its `due_at` passed (SKIP LOCKED; the claim moves `epoch`, which
fences every later write of that delivery, and holds it for a lease). An attempt is
counted before its call, in the statement that takes the service's bulkhead slot. The
slot is a `service_slots` row held under the saga's id with the negated notification
epoch, so it never meets a saga lease's epoch, and frees itself when `held_until`
passes, as any slot does.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from psycopg_pool import AsyncConnectionPool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.breaker import Breaker, Passage
from app.core.definition import STORED, NotifySpec
from app.core.states import CircuitState, NotificationStatus, SagaStatus, SlotKind
from app.engine.ports import (
    NotificationJob,
    NotifyFinish,
    NotifyRefusal,
    NotifyStart,
    NotifyStarted,
)
from app.store import engine_sql as sql
from app.store.documents import SagaDocuments

CLAIM_NOTIFICATIONS = text(
    """
    UPDATE notifications AS n
       SET epoch = n.epoch + 1,
           due_at = clock_timestamp() + make_interval(secs => :lease),
           updated_at = now()
      FROM (SELECT saga_id FROM notifications
             WHERE status = 'pending' AND due_at <= now()
             ORDER BY due_at
             LIMIT :limit
             FOR UPDATE SKIP LOCKED) AS due, sagas AS s
     WHERE n.saga_id = due.saga_id AND s.id = n.saga_id AND s.notify IS NOT NULL
    RETURNING n.saga_id, n.epoch, n.attempts, n.saga_status, s.notify, now() AS db_now
    """
)

HELD = text(
    """
    SELECT n.saga_id, n.epoch, n.attempts, n.saga_status, s.notify, now() AS db_now
      FROM notifications AS n JOIN sagas AS s ON s.id = n.saga_id
     WHERE n.saga_id = :id AND n.epoch = :epoch AND n.status = 'pending'
       AND s.notify IS NOT NULL
    """
)

LOCK = text(
    """
    SELECT saga_id FROM notifications
     WHERE saga_id = :id AND epoch = :epoch AND status = 'pending'
       FOR UPDATE
    """
)

BREAKER = text(
    """
    SELECT cb.state, cb.consecutive_failures, cb.opened_at, s.version, now() AS db_now
      FROM circuit_breakers AS cb JOIN services AS s ON s.name = cb.service
     WHERE cb.service = :service
    """
)

COUNT_ATTEMPT = text(
    """
    UPDATE notifications
       SET attempts = attempts + 1,
           due_at = clock_timestamp() + make_interval(secs => :lease),
           updated_at = now()
     WHERE saga_id = :id AND epoch = :epoch AND status = 'pending'
    RETURNING attempts, now() AS db_now
    """
)

RENEW = text(
    """
    WITH renewed AS (
      UPDATE notifications
         SET due_at = clock_timestamp() + make_interval(secs => :lease)
       WHERE saga_id = :id AND epoch = :epoch AND status = 'pending'
      RETURNING saga_id
    ), slots AS (
      UPDATE service_slots SET held_until = clock_timestamp() + make_interval(secs => :lease)
       WHERE saga_id = :id AND epoch = :slot_epoch AND EXISTS (SELECT 1 FROM renewed)
    )
    SELECT count(*) AS n FROM renewed
    """
)

POSTPONE = text(
    """
    UPDATE notifications
       SET due_at = now() + make_interval(secs => :delay), updated_at = now()
     WHERE saga_id = :id AND epoch = :epoch AND status = 'pending'
    RETURNING saga_id
    """
)

FINISH = text(
    """
    UPDATE notifications
       SET status = CAST(:status AS text),
           due_at = CASE WHEN CAST(:status AS text) = 'pending'
                         THEN now() + make_interval(secs => :delay) END,
           last_error = CAST(:error AS jsonb),
           delivered_at = CASE WHEN CAST(:status AS text) = 'delivered' THEN now() END,
           updated_at = now()
     WHERE saga_id = :id AND epoch = :epoch AND status = 'pending'
    RETURNING saga_id
    """
)

RELEASE_SLOTS = text(
    """
    UPDATE service_slots SET saga_id = NULL, epoch = NULL, held_until = NULL
     WHERE saga_id = :id AND epoch = :slot_epoch
    """
)

EVENT = text(
    """
    INSERT INTO saga_events (saga_id, type, direction, attempt, status_code, error_kind,
                             message, worker)
    VALUES (:id, :type, 'notify', :attempt, :status_code, :error_kind, :message, :worker)
    """
)

DEAD_LETTER = text(
    """
    INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                              service, attempts, last_error, request)
    SELECT :dl_id, id, definition_name, NULL, NULL, 'notify', :service, :attempts,
           CAST(:last_error AS jsonb), CAST(:request AS jsonb)
      FROM sagas WHERE id = :id
    ON CONFLICT (saga_id) WHERE status = 'open' AND direction = 'notify' DO NOTHING
    """
)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _job(row: Any) -> NotificationJob:
    return NotificationJob(
        saga_id=row.saga_id,
        epoch=int(row.epoch),
        attempts=int(row.attempts),
        saga_status=SagaStatus(row.saga_status),
        notify=NotifySpec.model_validate(row.notify, context=STORED),
        db_now=row.db_now,
    )


def _breaker(row: Any) -> Breaker:
    return Breaker(CircuitState(row.state), row.consecutive_failures, row.opened_at)


class PgNotifications:
    """Mixed into the saga repository: the same engine, hot pool, worker and lease."""

    engine: AsyncEngine
    worker: str
    lease: float

    async def _hot(self) -> AsyncConnectionPool:
        raise NotImplementedError

    def _fenced(self, job: NotificationJob) -> dict[str, Any]:
        return {"id": job.saga_id, "epoch": job.epoch, "slot_epoch": -job.epoch}

    async def claim_notifications(self, limit: int) -> list[NotificationJob]:
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(CLAIM_NOTIFICATIONS, {"lease": self.lease, "limit": limit})
            ).all()
        return [_job(r) for r in rows]

    async def held_notification(self, saga_id: uuid.UUID, epoch: int) -> NotificationJob | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(HELD, {"id": saga_id, "epoch": epoch})).first()
        return _job(row) if row is not None else None

    async def saga_view(self, saga_id: uuid.UUID) -> bytes | None:
        document = await SagaDocuments(await self._hot()).view(saga_id)
        return document.body if document is not None else None

    async def start_notification(
        self, job: NotificationJob, start: NotifyStart
    ) -> NotifyStarted | NotifyRefusal:
        fenced = self._fenced(job)
        async with self.engine.begin() as conn:
            if (await conn.execute(LOCK, fenced)).first() is None:
                return NotifyRefusal.FENCED
            if start.service is not None:
                refusal = await self._take_slots(conn, job, start)
                if refusal is not None:
                    await conn.rollback()
                    return refusal
            row = (await conn.execute(COUNT_ATTEMPT, {**fenced, "lease": self.lease})).first()
            assert row is not None  # locked above
        return NotifyStarted(int(row.attempts), row.db_now)

    async def _take_slots(
        self, conn: AsyncConnection, job: NotificationJob, start: NotifyStart
    ) -> NotifyRefusal | None:
        """The service as the gate saw it, then its bulkhead slot (and a probe slot)."""
        probe = start.passage is Passage.PROBE
        statement = BREAKER
        if probe:  # "exactly half_open_max_calls probes": serialised on the breaker's row
            statement = text(BREAKER.text + " FOR UPDATE OF cb")
        row = (await conn.execute(statement, {"service": start.service})).first()
        if row is None or int(row.version) != start.version or _breaker(row) != start.breaker:
            return NotifyRefusal.STALE
        after = start.breaker_after
        if probe and after is not None and after != start.breaker:
            await conn.execute(
                sql.WRITE_BREAKER,
                {
                    "service": start.service,
                    "state": after.state.value,
                    "failures": after.consecutive_failures,
                    "opened_at": after.opened_at,
                    "was_state": row.state,
                    "was_failures": row.consecutive_failures,
                    "was_opened_at": row.opened_at,
                },
            )
        kinds = (SlotKind.PROBE, SlotKind.CALL) if probe else (SlotKind.CALL,)
        for kind in kinds:
            taken = (
                await conn.execute(
                    sql.TAKE_SLOT,
                    {
                        "id": job.saga_id,
                        "epoch": -job.epoch,
                        "lease": self.lease,
                        "service": start.service,
                        "kind": kind.value,
                    },
                )
            ).first()
            if taken is None:
                return NotifyRefusal.NO_SLOT
        return None

    async def renew_notification(self, job: NotificationJob) -> bool:
        async with self.engine.begin() as conn:
            n = (await conn.execute(RENEW, {**self._fenced(job), "lease": self.lease})).scalar_one()
        return bool(n)

    async def postpone_notification(self, job: NotificationJob, delay_seconds: float) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    POSTPONE, {**self._fenced(job), "delay": max(delay_seconds, 0.0)}
                )
            ).first()
        return row is not None

    async def finish_notification(self, job: NotificationJob, finish: NotifyFinish) -> bool:
        fenced = self._fenced(job)
        async with self.engine.begin() as conn:
            await conn.execute(RELEASE_SLOTS, fenced)
            row = (
                await conn.execute(
                    FINISH,
                    {
                        **fenced,
                        "status": finish.status.value,
                        "delay": max(finish.delay_seconds, 0.0),
                        "error": _json(finish.error),
                    },
                )
            ).first()
            if row is None:
                return False
            if finish.event is not None:
                error = finish.error or {}
                await conn.execute(
                    EVENT,
                    {
                        "id": job.saga_id,
                        "type": finish.event.value,
                        "attempt": finish.attempt,
                        "status_code": finish.status_code,
                        "error_kind": error.get("kind"),
                        "message": error.get("message"),
                        "worker": self.worker,
                    },
                )
            if finish.dead_letter and finish.status is NotificationStatus.FAILED:
                await conn.execute(
                    DEAD_LETTER,
                    {
                        "dl_id": uuid.uuid4(),
                        "id": job.saga_id,
                        "service": finish.service,
                        "attempts": finish.attempt,
                        "last_error": _json(finish.error),
                        "request": _json(finish.request),
                    },
                )
        return True
