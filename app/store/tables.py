"""Typed SQLAlchemy models: the schema that the Alembic migrations must produce.

Statuses are Python enums stored as text with a CHECK constraint each; every
timestamp is timezone-aware and set by the database clock.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.core.states import (
    AttemptOutcome,
    CircuitState,
    DeadLetterStatus,
    Direction,
    ErrorKind,
    EventType,
    NotificationStatus,
    SagaStatus,
    SlotKind,
    StepStatus,
    WaitReason,
)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def status_enum(enum_cls: type[StrEnum], name: str) -> Enum:
    """Text column with a CHECK constraint listing the enum's values."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def tstz(nullable: bool = False, default_now: bool = False) -> Any:
    return mapped_column(
        DateTime(timezone=True),
        nullable=nullable,
        server_default=func.now() if default_now else None,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Service(Base):
    __tablename__ = "services"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    base_url: Mapped[str] = mapped_column(Text)
    timeout_seconds: Mapped[float] = mapped_column(Double)
    max_concurrency: Mapped[int] = mapped_column(Integer)
    failure_threshold: Mapped[int] = mapped_column(Integer)
    recovery_timeout_seconds: Mapped[float] = mapped_column(Double)
    half_open_max_calls: Mapped[int] = mapped_column(Integer)
    headers: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # Bumped by every change: executors re-read a service whose version moved, so a
    # call that starts after a change's response uses the changed service.
    version: Mapped[int] = mapped_column(BigInteger, server_default="1")
    created_at: Mapped[datetime] = tstz(default_now=True)
    updated_at: Mapped[datetime] = tstz(default_now=True)


class CircuitBreaker(Base):
    """Shared breaker state of one service, seen by every executor process. It is written
    only when its state changes, with compare-and-set; calls in flight are counted by the
    slots they hold (`service_slots`), not here."""

    __tablename__ = "circuit_breakers"

    service: Mapped[str] = mapped_column(
        Text, ForeignKey("services.name", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[CircuitState] = mapped_column(
        status_enum(CircuitState, "circuit_state"), server_default=CircuitState.CLOSED.value
    )
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default="0")
    opened_at: Mapped[datetime | None] = tstz(nullable=True)
    updated_at: Mapped[datetime] = tstz(default_now=True)


class ServiceSlot(Base):
    """A bulkhead slot (`call`, `max_concurrency` of them) or a half-open probe slot
    (`probe`, `half_open_max_calls`) of a service. A call holds one while it is in flight,
    until `held_until`, which follows the holding saga's lease: a crashed process's slots
    free themselves. Acquired with SKIP LOCKED, so calls to one service never queue on a
    row lock, and never more than the number of rows are held at once."""

    __tablename__ = "service_slots"
    __table_args__ = (
        Index("ix_service_slots_free", "service", "kind", "held_until"),
        Index("ix_service_slots_saga", "saga_id", postgresql_where=text("saga_id IS NOT NULL")),
    )

    service: Mapped[str] = mapped_column(
        Text, ForeignKey("services.name", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[SlotKind] = mapped_column(status_enum(SlotKind, "slot_kind"), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    saga_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    epoch: Mapped[int | None] = mapped_column(BigInteger)
    held_until: Mapped[datetime | None] = tstz(nullable=True)


class Definition(Base):
    __tablename__ = "definitions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = tstz(default_now=True)


class Saga(Base):
    """One saga run. `due_at` says when an executor should next look at it (NULL: never)."""

    __tablename__ = "sagas"
    __table_args__ = (
        # The claim query walks this partial index in due order; terminal sagas leave it.
        Index("ix_sagas_due", "due_at", postgresql_where=text("due_at IS NOT NULL")),
        Index("ix_sagas_created", text("created_at DESC"), text("id DESC")),
        Index("ix_sagas_status_created", "status", text("created_at DESC")),
        Index("ix_sagas_definition_created", "definition_name", text("created_at DESC")),
        Index("ix_sagas_idempotency_key", "idempotency_key"),
        # /metrics counts the sagas in flight by definition and status from this index
        # alone, however many finished sagas the table holds.
        Index(
            "ix_sagas_active",
            "definition_name",
            "status",
            postgresql_where=text("status IN ('running', 'compensating')"),
        ),
        # `?business_key=`, newest first; most sagas may have none.
        Index(
            "ix_sagas_business_key",
            "business_key",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("business_key IS NOT NULL"),
        ),
        # `?label=k:v`: containment (`labels @> '{"k": "v"}'`).
        Index(
            "ix_sagas_labels",
            "labels",
            postgresql_using="gin",
            postgresql_ops={"labels": "jsonb_path_ops"},
        ),
        # An exclusive definition: at most one non-terminal saga per business key. The
        # database holds the rule, whatever the number of API replicas; a saga leaves the
        # index with the commit that makes it terminal.
        Index(
            "uq_sagas_exclusive",
            "definition_name",
            "business_key",
            unique=True,
            postgresql_where=text("exclusive AND status IN ('running', 'compensating')"),
        ),
        CheckConstraint("NOT exclusive OR business_key IS NOT NULL", name="exclusive_needs_key"),
        # Retention walks finished sagas, oldest first.
        Index("ix_sagas_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
        # Room on each page for the step commits' updates to stay HOT (no index entries).
        {"postgresql_with": {"fillfactor": 70}},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    definition_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("definitions.id"))
    definition_name: Mapped[str] = mapped_column(Text)
    definition_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[SagaStatus] = mapped_column(status_enum(SagaStatus, "saga_status"))
    input: Mapped[Any] = mapped_column(JSONB)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    deadline_at: Mapped[datetime | None] = tstz(nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    request_id: Mapped[str | None] = mapped_column(Text)
    traceparent: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = tstz(default_now=True)
    updated_at: Mapped[datetime] = tstz(default_now=True)
    finished_at: Mapped[datetime | None] = tstz(nullable=True)
    due_at: Mapped[datetime | None] = tstz(nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    lease_expires_at: Mapped[datetime | None] = tstz(nullable=True)
    # Why a due saga is not being called (circuit open, bulkhead full), and on which
    # service, for operators and for the deadline's error kind.
    waiting_reason: Mapped[WaitReason | None] = mapped_column(
        status_enum(WaitReason, "wait_reason")
    )
    waiting_service: Mapped[str | None] = mapped_column(Text)
    # The pivot's call is in flight or has succeeded: a cancel can no longer unwind the
    # saga. Written with the pivot's own commits, read by the cancel in one statement.
    pivot_locked: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Unexpected errors of the executor on this saga since it last made progress; at
    # CRASH_LIMIT the saga is parked for an operator instead of being claimed again.
    crashes: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    # The caller's business key and labels (to find the saga again), and whether it was
    # started on an `exclusive` definition (then its business key is unique among the
    # non-terminal sagas of the definition: `uq_sagas_exclusive`).
    business_key: Mapped[str | None] = mapped_column(Text)
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    exclusive: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The completion notification's target with its retry policy (a NotifySpec document),
    # resolved at start from the request or the definition; NULL: none.
    notify: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class Notification(Base):
    """A saga's completion notification, armed by the commit that makes the saga terminal
    (when it has a target) and delivered by the executors: `due_at` says when one should
    next try (held by a lease while one delivers); `epoch` fences each claim's writes."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_due", "due_at", postgresql_where=text("status = 'pending'")),
    )

    saga_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sagas.id", ondelete="CASCADE"), primary_key=True
    )
    status: Mapped[NotificationStatus] = mapped_column(
        status_enum(NotificationStatus, "notification_status")
    )
    saga_status: Mapped[SagaStatus] = mapped_column(status_enum(SagaStatus, "saga_status"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    due_at: Mapped[datetime | None] = tstz(nullable=True)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    delivered_at: Mapped[datetime | None] = tstz(nullable=True)
    updated_at: Mapped[datetime] = tstz(default_now=True)


class SagaStep(Base):
    __tablename__ = "saga_steps"
    __table_args__ = {"postgresql_with": {"fillfactor": 70}}

    saga_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sagas.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[StepStatus] = mapped_column(status_enum(StepStatus, "step_status"))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    compensation_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # True once a settled attempt may have applied the action (timeout, lost connection,
    # 5xx, success).
    maybe_applied: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # An attempt started (recorded before the call) whose outcome is not recorded yet; a
    # crash leaves it set, and the next owner judges that attempt cut off.
    in_flight: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[Any | None] = mapped_column(JSONB)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    started_at: Mapped[datetime | None] = tstz(nullable=True)
    finished_at: Mapped[datetime | None] = tstz(nullable=True)


class CallbackToken(Base):
    """One attempt of a callback step: the SHA-256 of its token (the token is never
    stored), when its wait is due, and the participant's report. A report and the end of
    the wait (timeout, cancel, a crash) each write `report` or `closed_at` only while both
    are empty: the row decides which one came first, so an attempt has one outcome."""

    __tablename__ = "callback_tokens"
    __table_args__ = (
        UniqueConstraint("saga_id", "step_idx", "attempt"),
        CheckConstraint("report IS NULL OR closed_at IS NULL", name="one_end"),
    )

    token_hash: Mapped[str] = mapped_column(Text, primary_key=True)
    saga_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sagas.id", ondelete="CASCADE")
    )
    step_idx: Mapped[int] = mapped_column(SmallInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime] = tstz()
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    reported_at: Mapped[datetime | None] = tstz(nullable=True)
    closed_at: Mapped[datetime | None] = tstz(nullable=True)
    created_at: Mapped[datetime] = tstz(default_now=True)


class SagaEvent(Base):
    """Append-only history: saga transitions and every attempt's start and outcome. No
    foreign key: events are written only by statements that update their saga under its
    lease, and retention deletes them with it (a key check per event cost a row lock)."""

    __tablename__ = "saga_events"
    __table_args__ = (Index("ix_saga_events_saga", "saga_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    saga_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    at: Mapped[datetime] = tstz(default_now=True)
    type: Mapped[EventType] = mapped_column(status_enum(EventType, "event_type"))
    step: Mapped[str | None] = mapped_column(Text)
    direction: Mapped[Direction | None] = mapped_column(status_enum(Direction, "direction"))
    attempt: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[AttemptOutcome | None] = mapped_column(
        status_enum(AttemptOutcome, "attempt_outcome")
    )
    status_code: Mapped[int | None] = mapped_column(Integer)
    error_kind: Mapped[ErrorKind | None] = mapped_column(status_enum(ErrorKind, "error_kind"))
    message: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Double)
    worker: Mapped[str | None] = mapped_column(Text)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires", "expires_at"),)

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    saga_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = tstz(default_now=True)
    expires_at: Mapped[datetime] = tstz()


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_status_created", "status", text("created_at DESC")),
        # A saga's dead letters (retention checks and deletes them by saga).
        Index("ix_dead_letters_saga", "saga_id"),
        # At most one open dead letter per step and direction.
        Index(
            "uq_dead_letters_open",
            "saga_id",
            "step_idx",
            "direction",
            unique=True,
            postgresql_where=text("status = 'open'"),
        ),
        # A notification's dead letter has no step: at most one open per saga.
        Index(
            "uq_dead_letters_open_notify",
            "saga_id",
            unique=True,
            postgresql_where=text("status = 'open' AND direction = 'notify'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    saga_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("sagas.id", ondelete="CASCADE")
    )
    definition_name: Mapped[str] = mapped_column(Text)
    # NULL for a notification's dead letter (direction `notify`): it has no step.
    step_idx: Mapped[int | None] = mapped_column(SmallInteger)
    step_name: Mapped[str | None] = mapped_column(Text)
    direction: Mapped[Direction] = mapped_column(status_enum(Direction, "direction"))
    service: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    status: Mapped[DeadLetterStatus] = mapped_column(
        status_enum(DeadLetterStatus, "dead_letter_status"),
        server_default=DeadLetterStatus.OPEN.value,
    )
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = tstz(default_now=True)
    resolved_at: Mapped[datetime | None] = tstz(nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(Text)


class AdminAudit(Base):
    __tablename__ = "admin_audit"
    __table_args__ = (Index("ix_admin_audit_at", text("at DESC")),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = tstz(default_now=True)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class AdminSession(Base):
    """A dashboard login. The cookie holds a random secret; only its SHA-256 is stored,
    and every request checks the row, so a logout (or an expiry) ends it everywhere."""

    __tablename__ = "admin_sessions"
    __table_args__ = (Index("ix_admin_sessions_expires", "expires_at"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # sha256 of the cookie secret
    actor: Mapped[str] = mapped_column(Text)
    client: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = tstz(default_now=True)
    expires_at: Mapped[datetime] = tstz()
    revoked_at: Mapped[datetime | None] = tstz(nullable=True)
