"""initial schema

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27 22:53:28.611930
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_audit")),
    )
    op.create_index(
        "ix_admin_audit_at", "admin_audit", [sa.literal_column("at DESC")], unique=False
    )
    op.create_table(
        "definitions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.Text(), nullable=False),
        sa.Column("spec", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_definitions")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_definitions_name_version")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index("ix_idempotency_keys_expires", "idempotency_keys", ["expires_at"], unique=False)
    op.create_table(
        "services",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("timeout_seconds", sa.Double(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("failure_threshold", sa.Integer(), nullable=False),
        sa.Column("recovery_timeout_seconds", sa.Double(), nullable=False),
        sa.Column("half_open_max_calls", sa.Integer(), nullable=False),
        sa.Column(
            "headers",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_services")),
    )
    op.create_table(
        "circuit_breakers",
        sa.Column("service", sa.Text(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "closed",
                "open",
                "half_open",
                name="circuit_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="closed",
            nullable=False,
        ),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("half_open_in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["service"],
            ["services.name"],
            name=op.f("fk_circuit_breakers_service_services"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("service", name=op.f("pk_circuit_breakers")),
    )
    op.create_table(
        "sagas",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("definition_id", sa.BigInteger(), nullable=False),
        sa.Column("definition_name", sa.Text(), nullable=False),
        sa.Column("definition_version", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "running",
                "compensating",
                "completed",
                "compensated",
                "failed",
                name="saga_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("traceparent", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_epoch", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["definition_id"], ["definitions.id"], name=op.f("fk_sagas_definition_id_definitions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sagas")),
    )
    op.create_index(
        "ix_sagas_created",
        "sagas",
        [sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
    )
    op.create_index(
        "ix_sagas_definition_created",
        "sagas",
        ["definition_name", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_sagas_due",
        "sagas",
        ["due_at"],
        unique=False,
        postgresql_where=sa.text("due_at IS NOT NULL"),
    )
    op.create_index("ix_sagas_idempotency_key", "sagas", ["idempotency_key"], unique=False)
    op.create_index(
        "ix_sagas_status_created",
        "sagas",
        ["status", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column("definition_name", sa.Text(), nullable=False),
        sa.Column("step_idx", sa.SmallInteger(), nullable=False),
        sa.Column("step_name", sa.Text(), nullable=False),
        sa.Column(
            "direction",
            sa.Enum(
                "action",
                "compensation",
                name="direction",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("service", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("request", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "open",
                "retried",
                "discarded",
                name="dead_letter_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            server_default="open",
            nullable=False,
        ),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagas.id"],
            name=op.f("fk_dead_letters_saga_id_sagas"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        "ix_dead_letters_status_created",
        "dead_letters",
        ["status", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(
        "uq_dead_letters_open",
        "dead_letters",
        ["saga_id", "step_idx", "direction"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
    )
    op.create_table(
        "saga_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column(
            "direction",
            sa.Enum(
                "action",
                "compensation",
                name="direction",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column(
            "outcome",
            sa.Enum(
                "started",
                "succeeded",
                "retryable",
                "failed",
                "abandoned",
                name="attempt_outcome",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=True,
        ),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error_kind", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"], ["sagas.id"], name=op.f("fk_saga_events_saga_id_sagas"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saga_events")),
    )
    op.create_index("ix_saga_events_saga", "saga_events", ["saga_id", "id"], unique=False)
    op.create_table(
        "saga_steps",
        sa.Column("saga_id", sa.UUID(), nullable=False),
        sa.Column("idx", sa.SmallInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "running",
                "succeeded",
                "failed",
                "fallback",
                "compensating",
                "compensated",
                "compensation_failed",
                name="step_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("compensation_attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("maybe_applied", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("last_error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"], ["sagas.id"], name=op.f("fk_saga_steps_saga_id_sagas"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("saga_id", "idx", name=op.f("pk_saga_steps")),
    )


def downgrade() -> None:
    op.drop_table("saga_steps")
    op.drop_index("ix_saga_events_saga", table_name="saga_events")
    op.drop_table("saga_events")
    op.drop_index(
        "uq_dead_letters_open",
        table_name="dead_letters",
        postgresql_where=sa.text("status = 'open'"),
    )
    op.drop_index("ix_dead_letters_status_created", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_sagas_status_created", table_name="sagas")
    op.drop_index("ix_sagas_idempotency_key", table_name="sagas")
    op.drop_index(
        "ix_sagas_due", table_name="sagas", postgresql_where=sa.text("due_at IS NOT NULL")
    )
    op.drop_index("ix_sagas_definition_created", table_name="sagas")
    op.drop_index("ix_sagas_created", table_name="sagas")
    op.drop_table("sagas")
    op.drop_table("circuit_breakers")
    op.drop_table("services")
    op.drop_index("ix_idempotency_keys_expires", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("definitions")
    op.drop_index("ix_admin_audit_at", table_name="admin_audit")
    op.drop_table("admin_audit")
