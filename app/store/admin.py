"""Operator actions: dead letters, breaker resets, and the audit log that records them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.states import DeadLetterStatus, Direction, SagaStatus, StepStatus
from app.store.registry import audit
from app.store.sagas import SAGA_WORK_CHANNEL
from app.store.tables import AdminAudit, DeadLetter, SagaEvent


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    id: uuid.UUID
    saga_id: uuid.UUID
    definition: str
    step: str
    step_idx: int
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
        """Run the parked step or compensation again with fresh attempts (same key).

        A compensation resumes a `failed` saga's unwinding; a step after the pivot
        resumes a `failed` saga going forward; a non-critical step of a `completed` saga
        runs again while the saga stays completed.
        """
        async with self.engine.begin() as conn:
            row = (await conn.execute(_LOCK, {"id": dl_id})).first()
            if row is None:
                return ActionResult.NOT_FOUND, "no such dead letter"
            if row.status == DeadLetterStatus.RETRIED.value:
                return ActionResult.ALREADY, "already retried"
            if row.status == DeadLetterStatus.DISCARDED.value:
                return ActionResult.CONFLICT, "the dead letter was discarded"
            saga_status = SagaStatus(row.saga_status)
            params = {"saga": row.saga_id, "idx": row.step_idx}
            if row.direction == Direction.COMPENSATION.value:
                if saga_status is not SagaStatus.FAILED:
                    return ActionResult.CONFLICT, f"the saga is {saga_status.value}, not failed"
                await conn.execute(
                    text(
                        """
                        UPDATE saga_steps SET status = :s, compensation_attempts = 0,
                                              finished_at = NULL
                         WHERE saga_id = :saga AND idx = :idx
                        """
                    ),
                    {**params, "s": StepStatus.COMPENSATING.value},
                )
                new_status = SagaStatus.COMPENSATING
            else:
                if saga_status not in (SagaStatus.COMPLETED, SagaStatus.FAILED):
                    return (
                        ActionResult.CONFLICT,
                        f"the saga is {saga_status.value}; only a completed or failed saga's "
                        "step can be retried",
                    )
                if saga_status is SagaStatus.FAILED and row.saga_error_step != row.step_name:
                    return (
                        ActionResult.CONFLICT,
                        "the saga failed at another step; retry that dead letter first",
                    )
                if row.saga_busy:
                    return ActionResult.CONFLICT, "the saga is being worked on; retry shortly"
                await conn.execute(
                    text(
                        """
                        UPDATE saga_steps SET status = 'pending', attempts = 0,
                                              finished_at = NULL
                         WHERE saga_id = :saga AND idx = :idx
                        """
                    ),
                    params,
                )
                new_status = (
                    SagaStatus.COMPLETED
                    if saga_status is SagaStatus.COMPLETED
                    else SagaStatus.RUNNING
                )
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
                    "saga": row.saga_id,
                    "status": new_status.value,
                    "keep_finished": new_status is SagaStatus.COMPLETED,
                    "clear_error": new_status is SagaStatus.RUNNING,
                },
            )
            await self._resolve(conn, dl_id, DeadLetterStatus.RETRIED, actor, None)
            await conn.execute(
                insert(SagaEvent).values(
                    saga_id=row.saga_id,
                    type="dead_letter_retried",
                    step=row.step_name,
                    direction=row.direction,
                    message=f"by {actor}",
                )
            )
            await self._audit(conn, actor, "dead_letter.retry", str(dl_id), {})
            await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": SAGA_WORK_CHANNEL})
        return ActionResult.DONE, "retrying"

    async def discard_dead_letter(
        self, dl_id: uuid.UUID, actor: str, reason: str
    ) -> tuple[ActionResult, str]:
        async with self.engine.begin() as conn:
            row = (await conn.execute(_LOCK, {"id": dl_id})).first()
            if row is None:
                return ActionResult.NOT_FOUND, "no such dead letter"
            if row.status == DeadLetterStatus.DISCARDED.value:
                return ActionResult.ALREADY, "already discarded"
            if row.status == DeadLetterStatus.RETRIED.value:
                return ActionResult.CONFLICT, "the dead letter was already retried"
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
