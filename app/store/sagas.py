"""Sagas as the API sees them: start (idempotently), read, list, history, cancel."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.states import NotificationStatus, SagaStatus, StepStatus
from app.core.views import (
    CancelResult,
    NewSaga,
    NotificationView,
    SagaSummary,
    SagaView,
    StartResult,
    StepSummary,
    StepView,
)
from app.store.tables import (
    CallbackToken,
    IdempotencyKey,
    Notification,
    Saga,
    SagaEvent,
    SagaStep,
)

SAGA_WORK_CHANNEL = "saga_work"
SAGA_DONE_CHANNEL = "saga_done"
NOTIFY_WAKE = "notify"  # a work wake-up for the notification loops (engine.notifier)


def _step_view(row: Any) -> StepView:
    return StepView(
        name=row.name,
        status=StepStatus(row.status),
        attempts=row.attempts,
        compensation_attempts=row.compensation_attempts,
        status_code=row.status_code,
        response=row.response,
        last_error=row.last_error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        maybe_applied=row.maybe_applied,
        in_flight=row.in_flight,
        callback_due_at=row.callback_due_at,
    )


def _notification(row: Any) -> NotificationView | None:
    if row.notify is None:
        return None
    status = NotificationStatus(row.notification_status or NotificationStatus.PENDING)
    return NotificationView(status, row.notification_attempts or 0)


def _saga_view(row: Any, steps: list[StepView]) -> SagaView:
    return SagaView(
        id=row.id,
        definition=row.definition_name,
        definition_version=row.definition_version,
        definition_id=row.definition_id,
        status=SagaStatus(row.status),
        input=row.input,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        error=row.error,
        deadline_at=row.deadline_at,
        cancel_requested=row.cancel_requested,
        steps=steps,
        business_key=row.business_key,
        labels=row.labels,
        notification=_notification(row),
    )


_SUMMARY_COLUMNS = (
    Saga.id,
    Saga.definition_name,
    Saga.definition_version,
    Saga.status,
    Saga.idempotency_key,
    Saga.created_at,
    Saga.updated_at,
    Saga.finished_at,
    Saga.error,
    Saga.deadline_at,
    Saga.cancel_requested,
    Saga.business_key,
    Saga.labels,
)
_STEP_SUMMARY_COLUMNS = (
    SagaStep.name,
    SagaStep.status,
    SagaStep.attempts,
    SagaStep.compensation_attempts,
    SagaStep.status_code,
    SagaStep.last_error,
    SagaStep.started_at,
    SagaStep.finished_at,
)


S = TypeVar("S")


def _summary(cls: type[S], row: Any, **given: Any) -> S:
    """A summary dataclass from a row: each field from the column of its name, unless given."""
    names = cls.__slots__  # type: ignore[attr-defined]
    return cls(**{name: given[name] if name in given else getattr(row, name) for name in names})


class SagaStore:
    """Queries behind the sagas API."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def start(self, new: NewSaga) -> tuple[StartResult, uuid.UUID]:
        """Create a saga; with an idempotency key, at most one saga per key, ever.

        The key row is claimed with INSERT … ON CONFLICT: concurrent requests with one
        key wait on the first one's transaction and then see its row. An expired key
        is taken over as if it were new.
        """
        saga_id = uuid.uuid4()
        async with self.engine.begin() as conn:
            if new.idempotency_key is not None:
                base = insert(IdempotencyKey).values(
                    key=new.idempotency_key,
                    fingerprint=new.fingerprint,
                    saga_id=saga_id,
                    expires_at=text("now() + make_interval(secs => :ttl)").bindparams(
                        ttl=new.key_ttl_seconds
                    ),
                )
                stmt = base.on_conflict_do_update(
                    index_elements=[IdempotencyKey.key],
                    set_={
                        "fingerprint": base.excluded.fingerprint,
                        "saga_id": base.excluded.saga_id,
                        "created_at": text("now()"),
                        "expires_at": base.excluded.expires_at,
                    },
                    where=IdempotencyKey.expires_at < text("now()"),
                ).returning(IdempotencyKey.saga_id)
                claimed = (await conn.execute(stmt)).first()
                if claimed is None:
                    existing = (
                        await conn.execute(
                            select(IdempotencyKey.fingerprint, IdempotencyKey.saga_id).where(
                                IdempotencyKey.key == new.idempotency_key
                            )
                        )
                    ).one()
                    if existing.fingerprint != new.fingerprint:
                        return StartResult.MISMATCH, existing.saga_id
                    return StartResult.REPLAYED, existing.saga_id
            await self._insert_saga(conn, saga_id, new)
        return StartResult.CREATED, saga_id

    async def _insert_saga(self, conn: AsyncConnection, saga_id: uuid.UUID, new: NewSaga) -> None:
        spec = new.definition.spec
        deadline = (
            text("now() + make_interval(secs => :t)").bindparams(t=spec.timeout_seconds)
            if spec.timeout_seconds
            else None
        )
        await conn.execute(
            insert(Saga).values(
                id=saga_id,
                definition_id=new.definition.id,
                definition_name=new.definition.name,
                definition_version=new.definition.version,
                status=SagaStatus.RUNNING,
                input=new.input,
                idempotency_key=new.idempotency_key,
                deadline_at=deadline,
                request_id=new.request_id,
                # Without a caller's trace, the saga is its own trace: all its calls join it.
                traceparent=new.traceparent or f"00-{saga_id.hex}-{secrets.token_hex(8)}-01",
                due_at=text("now()"),
                notify=new.notify,
            )
        )
        await conn.execute(
            insert(SagaStep),
            [
                {"saga_id": saga_id, "idx": i, "name": s.name, "status": StepStatus.PENDING}
                for i, s in enumerate(spec.steps)
            ],
        )
        await conn.execute(insert(SagaEvent).values(saga_id=saga_id, type="saga_started"))
        await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": SAGA_WORK_CHANNEL})

    async def get(self, saga_id: uuid.UUID) -> SagaView | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        Saga,
                        Notification.status.label("notification_status"),
                        Notification.attempts.label("notification_attempts"),
                    )
                    .outerjoin(Notification, Notification.saga_id == Saga.id)
                    .where(Saga.id == saga_id)
                )
            ).first()
            if row is None:
                return None
            due = (
                select(CallbackToken.due_at)
                .where(
                    SagaStep.status == StepStatus.WAITING,
                    CallbackToken.saga_id == SagaStep.saga_id,
                    CallbackToken.step_idx == SagaStep.idx,
                    CallbackToken.attempt == SagaStep.attempts,
                )
                .scalar_subquery()
                .label("callback_due_at")
            )
            steps = (
                await conn.execute(
                    select(SagaStep, due).where(SagaStep.saga_id == saga_id).order_by(SagaStep.idx)
                )
            ).all()
        return _saga_view(row, [_step_view(s) for s in steps])

    async def status(self, saga_id: uuid.UUID) -> SagaStatus | None:
        async with self.engine.connect() as conn:
            value = (
                await conn.execute(select(Saga.status).where(Saga.id == saga_id))
            ).scalar_one_or_none()
        return SagaStatus(value) if value is not None else None

    async def list_page(
        self,
        limit: int,
        status: SagaStatus | None = None,
        definition: str | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
        business_key: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[SagaSummary]:
        """Newest first; `before` is the (created_at, id) of the last item already seen.
        `labels`: only sagas that have every one of these pairs (`labels @> …`, on the
        GIN index); `business_key` walks its own index in list order."""
        stmt = (
            select(*_SUMMARY_COLUMNS).order_by(Saga.created_at.desc(), Saga.id.desc()).limit(limit)
        )
        if status is not None:
            stmt = stmt.where(Saga.status == status)
        if definition is not None:
            stmt = stmt.where(Saga.definition_name == definition)
        if business_key is not None:
            stmt = stmt.where(Saga.business_key == business_key)
        if labels:
            stmt = stmt.where(Saga.labels.contains(labels))
        if before is not None:
            stmt = stmt.where(tuple_(Saga.created_at, Saga.id) < tuple_(*before))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
            ids = [r.id for r in rows]
            step_rows = (
                (
                    await conn.execute(
                        select(SagaStep.saga_id, *_STEP_SUMMARY_COLUMNS)
                        .where(SagaStep.saga_id.in_(ids))
                        .order_by(SagaStep.saga_id, SagaStep.idx)
                    )
                ).all()
                if ids
                else []
            )
        by_saga: dict[uuid.UUID, list[StepSummary]] = {}
        for st in step_rows:
            by_saga.setdefault(st.saga_id, []).append(
                _summary(StepSummary, st, status=StepStatus(st.status))
            )
        return [
            _summary(
                SagaSummary,
                r,
                definition=r.definition_name,
                status=SagaStatus(r.status),
                steps=by_saga.get(r.id, []),
            )
            for r in rows
        ]

    async def events(
        self, saga_id: uuid.UUID, limit: int, after: int | None = None
    ) -> list[dict[str, Any]]:
        stmt = (
            select(SagaEvent)
            .where(SagaEvent.saga_id == saga_id)
            .order_by(SagaEvent.id)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(SagaEvent.id > after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [dict(r._mapping) for r in rows]

    async def request_cancel(self, saga_id: uuid.UUID) -> CancelResult:
        """Flag the saga; the executor that next touches it starts compensating.

        The pivot rule is decided here, in the statement: `pivot_locked` is set by the
        commit that starts the pivot's attempt, so a cancel either commits first (and the
        pivot never starts) or finds it locked (409). When no executor holds a live
        lease, the saga is made due at once.
        """
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        """
                        UPDATE sagas SET cancel_requested = true, updated_at = now(),
                          due_at = CASE WHEN lease_owner IS NULL OR lease_expires_at < now()
                                        THEN now() ELSE due_at END
                        WHERE id = :id AND status IN ('running', 'compensating')
                          AND NOT pivot_locked
                        RETURNING id
                        """
                    ),
                    {"id": saga_id},
                )
            ).first()
            if row is not None:
                await conn.execute(
                    insert(SagaEvent).values(saga_id=saga_id, type="cancel_requested")
                )
                await conn.execute(text("SELECT pg_notify(:c, '')"), {"c": SAGA_WORK_CHANNEL})
                return CancelResult.ACCEPTED
            found = (
                await conn.execute(select(Saga.status, Saga.pivot_locked).where(Saga.id == saga_id))
            ).first()
        if found is None:
            return CancelResult.NOT_FOUND
        if SagaStatus(found.status).terminal:
            return CancelResult.TERMINAL
        return CancelResult.PAST_PIVOT

    async def schedule(self, saga_id: uuid.UUID) -> dict[str, Any] | None:
        """Executor-side fields, for explaining what a saga waits for."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT due_at, waiting_reason, waiting_service, lease_owner, "
                        "lease_expires_at, now() AS db_now "
                        "FROM sagas WHERE id = :id"
                    ),
                    {"id": saga_id},
                )
            ).first()
        return dict(row._mapping) if row else None

    async def find_by_key(self, key: str) -> uuid.UUID | None:
        async with self.engine.connect() as conn:
            value: uuid.UUID | None = (
                await conn.execute(
                    select(Saga.id)
                    .where(Saga.idempotency_key == key)
                    .order_by(Saga.created_at.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        return value
