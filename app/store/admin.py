"""Operator actions: dead letters, breaker resets, and the audit log that records them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.deadletters import (
    Refusal,
    RetryPlan,
    plan_discard,
    plan_notify_retry,
    plan_retry,
)
from app.core.states import DeadLetterStatus, Direction, EventType, SagaStatus
from app.core.views import ActionResult, DeadLetterView
from app.store.registry import audit
from app.store.sagas import NOTIFY_WAKE, SAGA_WORK_CHANNEL
from app.store.tables import AdminAudit, DeadLetter, SagaEvent


def _view(row: Any) -> DeadLetterView:
    return DeadLetterView(
        id=row.id,
        saga_id=row.saga_id,
        definition=row.definition_name,
        step=row.step_name,
        step_idx=row.step_idx,
        direction=Direction(row.direction),
        service=row.service,
        attempts=row.attempts,
        last_error=row.last_error,
        request=row.request,
        status=DeadLetterStatus(row.status),
        reason=row.reason,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        resolved_by=row.resolved_by,
    )


_LOCK = text(
    """
    SELECT dl.*, s.status AS saga_status, s.error ->> 'step' AS saga_error_step,
           (s.lease_owner IS NOT NULL AND s.lease_expires_at > now()) AS saga_busy
      FROM dead_letters AS dl JOIN sagas AS s ON s.id = dl.saga_id
     WHERE dl.id = :id
       FOR UPDATE OF dl, s
    """
)


_REARM = text(
    """
    UPDATE notifications
       SET status = 'pending', attempts = 0, epoch = epoch + 1, due_at = now(),
           last_error = NULL, delivered_at = NULL, updated_at = now()
     WHERE saga_id = :saga
    """
)
_UNARM = text(
    """
    UPDATE notifications
       SET status = 'pending', attempts = 0, epoch = epoch + 1, due_at = NULL,
           last_error = NULL, delivered_at = NULL, updated_at = now()
     WHERE saga_id = :saga
    """
)


class AdminStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def dead_letters(
        self,
        limit: int,
        status: DeadLetterStatus | None = None,
        definition: str | None = None,
        service: str | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[DeadLetterView]:
        stmt = (
            select(DeadLetter)
            .order_by(DeadLetter.created_at.desc(), DeadLetter.id.desc())
            .limit(limit)
        )
        if status is not None:
            stmt = stmt.where(DeadLetter.status == status)
        if definition is not None:
            stmt = stmt.where(DeadLetter.definition_name == definition)
        if service is not None:
            stmt = stmt.where(DeadLetter.service == service)
        if before is not None:
            stmt = stmt.where(tuple_(DeadLetter.created_at, DeadLetter.id) < tuple_(*before))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_view(r) for r in rows]

    async def dead_letter(self, dl_id: uuid.UUID) -> DeadLetterView | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(DeadLetter).where(DeadLetter.id == dl_id))).first()
        return _view(row) if row else None

    async def retry_dead_letter(self, dl_id: uuid.UUID, actor: str) -> tuple[ActionResult, str]:
        """Run the parked step or compensation again with fresh attempts (same key), as
        `core.deadletters.plan_retry` decides on the locked rows."""
        async with self.engine.begin() as conn:
            row = (await conn.execute(_LOCK, {"id": dl_id})).first()
            if row is None:
                return ActionResult.NOT_FOUND, "no such dead letter"
            if Direction(row.direction) is Direction.NOTIFY:
                return await self._retry_notification(conn, row, actor)
            plan = plan_retry(
                DeadLetterStatus(row.status),
                Direction(row.direction),
                row.step_name,
                SagaStatus(row.saga_status),
                row.saga_error_step,
                row.saga_busy,
            )
            if isinstance(plan, Refusal):
                return (
                    ActionResult.ALREADY if plan.already else ActionResult.CONFLICT
                ), plan.message
            await conn.execute(
                text(
                    """
                    UPDATE saga_steps
                       SET status = :s, finished_at = NULL, in_flight = false,
                           attempts = CASE WHEN :forward THEN 0 ELSE attempts END,
                           compensation_attempts = CASE WHEN :forward THEN compensation_attempts
                                                        ELSE 0 END
                     WHERE saga_id = :saga AND idx = :idx
                    """
                ),
                {
                    "saga": row.saga_id,
                    "idx": row.step_idx,
                    "s": plan.step_status.value,
                    "forward": plan.reset_attempts,
                },
            )
            try:
                await self._resume(conn, row.saga_id, plan)
            except IntegrityError:  # uq_sagas_exclusive: its business key is taken again
                await conn.rollback()
                return ActionResult.CONFLICT, (
                    "the definition is exclusive and another saga with this saga's business "
                    "key is running now; retry once it has finished"
                )
            await self._resolve(conn, dl_id, DeadLetterStatus.RETRIED, actor, None)
            await conn.execute(
                insert(SagaEvent).values(
                    saga_id=row.saga_id,
                    type=EventType.DEAD_LETTER_RETRIED,
                    step=row.step_name,
                    direction=row.direction,
                    message=f"by {actor}",
                )
            )
            await self._audit(conn, actor, "dead_letter.retry", str(dl_id), {})
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": SAGA_WORK_CHANNEL})
        return ActionResult.DONE, "retrying"

    async def _retry_notification(
        self, conn: AsyncConnection, row: Any, actor: str
    ) -> tuple[ActionResult, str]:
        """A notification's dead letter: the notification is due again at once, with
        fresh attempts and the same key; the saga is not touched."""
        refused = plan_notify_retry(DeadLetterStatus(row.status), SagaStatus(row.saga_status))
        if refused is not None:
            return (ActionResult.ALREADY if refused.already else ActionResult.CONFLICT), (
                refused.message
            )
        await conn.execute(_REARM, {"saga": row.saga_id})
        await self._resolve(conn, row.id, DeadLetterStatus.RETRIED, actor, None)
        await conn.execute(
            insert(SagaEvent).values(
                saga_id=row.saga_id,
                type=EventType.DEAD_LETTER_RETRIED,
                direction=Direction.NOTIFY,
                message=f"by {actor}",
            )
        )
        await self._audit(conn, actor, "dead_letter.retry", str(row.id), {})
        await conn.execute(
            text("SELECT pg_notify(:c, :p)"), {"c": SAGA_WORK_CHANNEL, "p": NOTIFY_WAKE}
        )
        return ActionResult.DONE, "retrying"

    async def _resume(self, conn: AsyncConnection, saga_id: uuid.UUID, plan: RetryPlan) -> None:
        """The saga goes back to work (a failed one may leave the terminal statuses: on an
        exclusive definition that needs its business key to be free). A saga that is no
        longer terminal has its notification pending again, not due: the commit that
        makes it terminal again arms it."""
        if not plan.saga_status.terminal:
            await conn.execute(_UNARM, {"saga": saga_id})
        await conn.execute(
            text(
                """
                UPDATE sagas SET status = :status, due_at = now(), updated_at = now(),
                       crashes = 0,
                       finished_at = CASE WHEN :keep_finished THEN finished_at END,
                       error = CASE WHEN :clear_error THEN NULL ELSE error END
                 WHERE id = :saga
                """
            ),
            {
                "saga": saga_id,
                "status": plan.saga_status.value,
                "keep_finished": plan.keep_finished,
                "clear_error": plan.clear_error,
            },
        )

    async def discard_dead_letter(
        self, dl_id: uuid.UUID, actor: str, reason: str
    ) -> tuple[ActionResult, str]:
        async with self.engine.begin() as conn:
            row = (await conn.execute(_LOCK, {"id": dl_id})).first()
            if row is None:
                return ActionResult.NOT_FOUND, "no such dead letter"
            refused = plan_discard(DeadLetterStatus(row.status))
            if refused is not None:
                result = ActionResult.ALREADY if refused.already else ActionResult.CONFLICT
                return result, refused.message
            await self._resolve(conn, dl_id, DeadLetterStatus.DISCARDED, actor, reason)
            await self._audit(conn, actor, "dead_letter.discard", str(dl_id), {"reason": reason})
        return ActionResult.DONE, "discarded"

    async def reset_circuit(self, service: str, actor: str) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        """
                        UPDATE circuit_breakers SET state = 'closed', consecutive_failures = 0,
                               opened_at = NULL, updated_at = now()
                         WHERE service = :s RETURNING service
                        """
                    ),
                    {"s": service},
                )
            ).first()
            if row is None:
                return False
            await self._audit(conn, actor, "circuit.reset", service, {})
            # Sagas waiting on the breaker are due at once.
            await conn.execute(
                text(
                    """
                    UPDATE sagas SET due_at = now(), waiting_reason = NULL, waiting_service = NULL
                     WHERE waiting_service = :s
                       AND waiting_reason IN ('circuit_open', 'half_open_probe_in_flight')
                       AND due_at > now() AND lease_owner IS NULL
                    """
                ),
                {"s": service},
            )
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": SAGA_WORK_CHANNEL})
        return True

    async def audit_log(self, limit: int, before_id: int | None = None) -> list[dict[str, Any]]:
        stmt = select(AdminAudit).order_by(AdminAudit.id.desc()).limit(limit)
        if before_id is not None:
            stmt = stmt.where(AdminAudit.id < before_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [dict(r._mapping) for r in rows]

    async def circuit_wait_seconds(self, service: str) -> float | None:
        """Seconds until an open circuit lets a probe through; None when it is not open."""
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(
                    text(
                        """
                        SELECT GREATEST(0, EXTRACT(EPOCH FROM cb.opened_at
                               + make_interval(secs => s.recovery_timeout_seconds) - now()))
                          FROM circuit_breakers AS cb JOIN services AS s ON s.name = cb.service
                         WHERE cb.service = :s AND cb.state = 'open'
                        """
                    ),
                    {"s": service},
                )
            ).scalar_one_or_none()
        return None if value is None else float(value)

    async def _resolve(
        self,
        conn: AsyncConnection,
        dl_id: uuid.UUID,
        status: DeadLetterStatus,
        actor: str,
        reason: str | None,
    ) -> None:
        await conn.execute(
            text(
                """
                UPDATE dead_letters SET status = :status, resolved_at = now(),
                       resolved_by = :actor, reason = :reason
                 WHERE id = :id
                """
            ),
            {"id": dl_id, "status": status.value, "actor": actor, "reason": reason},
        )

    async def _audit(
        self, conn: AsyncConnection, actor: str, action: str, target: str, details: dict[str, Any]
    ) -> None:
        await audit(conn, actor, action, target, details)
