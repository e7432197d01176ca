"""Completion notifications: the saga's target, the notification's state, step-less
dead letters

Revision ID: 0008_notifications
Revises: 0007_callback_steps
Create Date: 2026-12-01 16:30:00

`sagas.notify` holds the notification target a saga was started with (resolved from the
request or its definition). `notifications` holds one row per saga that has one, armed
by the commit that makes the saga terminal: pending until delivered or failed for good,
with its attempts and when an executor should next try (`due_at`, a partial index over
the pending ones). A notification's dead letter has no step: `step_idx` and `step_name`
become nullable, and at most one such letter per saga is open.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_notifications"
down_revision: str | None = "0007_callback_steps"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SAGA_STATUSES = ("running", "compensating", "completed", "compensated", "failed")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.add_column("sagas", sa.Column("notify", postgresql.JSONB(astext_type=sa.Text())))
    op.create_table(
        "notifications",
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "delivered",
                "failed",
                name="notification_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "saga_status",
            sa.Enum(
                *SAGA_STATUSES,
                name="saga_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("epoch", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagas.id"],
            name=op.f("fk_notifications_saga_id_sagas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("saga_id", name=op.f("pk_notifications")),
    )
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["due_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.alter_column("dead_letters", "step_idx", nullable=True)
    op.alter_column("dead_letters", "step_name", nullable=True)
    op.create_index(
        "uq_dead_letters_open_notify",
        "dead_letters",
        ["saga_id"],
        unique=True,
        postgresql_where=sa.text("status = 'open' AND direction = 'notify'"),
    )


def downgrade() -> None:
    op.drop_index("uq_dead_letters_open_notify", table_name="dead_letters")
    op.execute("DELETE FROM dead_letters WHERE step_idx IS NULL OR step_name IS NULL")
    op.alter_column("dead_letters", "step_name", nullable=False)
    op.alter_column("dead_letters", "step_idx", nullable=False)
    op.drop_index("ix_notifications_due", table_name="notifications")
    op.drop_table("notifications")
    op.drop_column("sagas", "notify")
