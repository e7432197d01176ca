"""Callback steps: tokens, the waiting status; enums for notifications

Revision ID: 0007_callback_steps
Revises: 0006_keys_retention
Create Date: 2026-12-01 15:30:00

A callback step's attempt holds one row in `callback_tokens`: the SHA-256 of its token
(the token itself is never stored), the attempt it is bound to, when it is due, and the
participant's report. The row is the arbiter between a report and the end of the wait
(timeout, cancel, a crash cutting the attempt off): each sets `report` or `closed_at`
only while both are still empty, so exactly one of them wins. The step statuses gain
`waiting`, attempt outcomes `accepted`, event types the callback report and the
notification outcomes, directions `notify` (a notification's dead letter).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_callback_steps"
down_revision: str | None = "0006_keys_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEP_STATUSES = (
    "pending",
    "running",
    "waiting",
    "succeeded",
    "failed",
    "fallback",
    "compensating",
    "compensated",
    "compensation_failed",
)
OUTCOMES = ("started", "succeeded", "accepted", "retryable", "failed", "abandoned")
EVENT_TYPES = (
    "saga_started",
    "attempt_started",
    "attempt_finished",
    "attempts_exhausted",
    "fallback_used",
    "compensation_started",
    "cancel_requested",
    "dead_letter_retried",
    "callback_reported",
    "notification_delivered",
    "notification_failed",
    "executor_error",
    "saga_completed",
    "saga_compensated",
    "saga_failed",
)
DIRECTIONS = ("action", "compensation", "notify")

# (table, constraint, column, values now)
CHECKS = (
    ("saga_steps", "ck_saga_steps_step_status", "status", STEP_STATUSES),
    ("saga_events", "ck_saga_events_attempt_outcome", "outcome", OUTCOMES),
    ("saga_events", "ck_saga_events_event_type", "type", EVENT_TYPES),
    ("saga_events", "ck_saga_events_direction", "direction", DIRECTIONS),
    ("dead_letters", "ck_dead_letters_direction", "direction", DIRECTIONS),
)


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _recheck(values_of: dict[str, Sequence[str]]) -> None:
    for table, name, column, _values in CHECKS:
        op.drop_constraint(op.f(name), table, type_="check")
        op.create_check_constraint(op.f(name), table, _in(column, values_of[name]))


def upgrade() -> None:
    op.create_table(
        "callback_tokens",
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column("step_idx", sa.SmallInteger(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("report", sa.dialects.postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "report IS NULL OR closed_at IS NULL", name=op.f("ck_callback_tokens_one_end")
        ),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagas.id"],
            name=op.f("fk_callback_tokens_saga_id_sagas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_callback_tokens")),
        sa.UniqueConstraint(
            "saga_id",
            "step_idx",
            "attempt",
            name=op.f("uq_callback_tokens_saga_id_step_idx_attempt"),
        ),
    )
    _recheck({name: values for _t, name, _c, values in CHECKS})


def downgrade() -> None:
    op.execute(
        "DELETE FROM saga_events WHERE type IN "
        "('callback_reported', 'notification_delivered', 'notification_failed')"
        " OR direction = 'notify' OR outcome = 'accepted'"
    )
    op.execute("DELETE FROM dead_letters WHERE direction = 'notify'")
    op.execute(
        "UPDATE saga_steps SET status = 'running', in_flight = true WHERE status = 'waiting'"
    )
    before: dict[str, Sequence[str]] = {
        "ck_saga_steps_step_status": [s for s in STEP_STATUSES if s != "waiting"],
        "ck_saga_events_attempt_outcome": [o for o in OUTCOMES if o != "accepted"],
        "ck_saga_events_event_type": [
            e for e in EVENT_TYPES if not e.startswith(("callback_", "notification_"))
        ],
        "ck_saga_events_direction": ["action", "compensation"],
        "ck_dead_letters_direction": ["action", "compensation"],
    }
    _recheck(before)
    op.drop_table("callback_tokens")
