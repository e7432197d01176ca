"""Engine core: bulkhead and probe slots, in-flight attempts, enums as CHECKs

Revision ID: 0005_engine_core
Revises: 0004_safe_by_default
Create Date: 2026-12-01 11:30:00

Calls in flight are held as slots (`service_slots`) instead of being counted from
`sagas.inflight_service`; a saga's wait reason and service are two columns instead of
one `reason:service` string; a step's in-flight attempt is its own column instead of a
pessimistic `maybe_applied`; event types and error kinds are checked like every other
enum. During a rolling upgrade the calls in flight under the old version are not
counted by the new one's bulkhead until they end.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_engine_core"
down_revision: str | None = "0004_safe_by_default"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "saga_started",
    "attempt_started",
    "attempt_finished",
    "attempts_exhausted",
    "fallback_used",
    "compensation_started",
    "cancel_requested",
    "dead_letter_retried",
    "executor_error",
    "saga_completed",
    "saga_compensated",
    "saga_failed",
)
ERROR_KINDS = (
    "http_status",
    "timeout",
    "connection",
    "circuit_open",
    "template",
    "deadline",
    "cancelled",
    "blocked",
    "callback_failed",
    "response_too_large",
)
WAIT_REASONS = ("circuit_open", "half_open_probe_in_flight", "bulkhead_full")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "service_slots",
        sa.Column("service", sa.Text(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "call",
                "probe",
                name="slot_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("saga_id", sa.UUID(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["service"],
            ["services.name"],
            name=op.f("fk_service_slots_service_services"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("service", "kind", "slot", name=op.f("pk_service_slots")),
    )
    op.create_index("ix_service_slots_free", "service_slots", ["service", "kind", "held_until"])
    op.create_index(
        "ix_service_slots_saga",
        "service_slots",
        ["saga_id"],
        postgresql_where=sa.text("saga_id IS NOT NULL"),
    )
    op.execute(
        """
        INSERT INTO service_slots (service, kind, slot)
        SELECT name, 'call', n FROM services, generate_series(1, max_concurrency) AS n
        UNION ALL
        SELECT name, 'probe', n FROM services, generate_series(1, half_open_max_calls) AS n
        """
    )

    op.add_column(
        "saga_steps",
        sa.Column("in_flight", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )

    op.add_column("sagas", sa.Column("waiting_reason", sa.String(32), nullable=True))
    op.add_column("sagas", sa.Column("waiting_service", sa.Text(), nullable=True))
    op.execute(
        f"""
        UPDATE sagas SET waiting_reason = split_part(waiting_on, ':', 1),
                         waiting_service = substr(waiting_on, strpos(waiting_on, ':') + 1)
         WHERE waiting_on IS NOT NULL AND {_in("split_part(waiting_on, ':', 1)", WAIT_REASONS)}
        """
    )
    op.create_check_constraint(
        op.f("ck_sagas_wait_reason"), "sagas", _in("waiting_reason", WAIT_REASONS)
    )
    op.drop_index(
        "ix_sagas_inflight_service",
        table_name="sagas",
        postgresql_where=sa.text("inflight_service IS NOT NULL"),
    )
    op.drop_column("sagas", "waiting_on")
    op.drop_column("sagas", "inflight_service")
    op.drop_column("sagas", "inflight_probe")

    op.alter_column("saga_events", "type", type_=sa.String(32), existing_type=sa.Text())
    op.create_check_constraint(
        op.f("ck_saga_events_event_type"), "saga_events", _in("type", EVENT_TYPES)
    )
    op.alter_column("saga_events", "error_kind", type_=sa.String(32), existing_type=sa.Text())
    op.execute(
        f"UPDATE saga_events SET error_kind = NULL WHERE NOT {_in('error_kind', ERROR_KINDS)}"
    )
    op.create_check_constraint(
        op.f("ck_saga_events_error_kind"), "saga_events", _in("error_kind", ERROR_KINDS)
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_saga_events_error_kind"), "saga_events", type_="check")
    op.alter_column("saga_events", "error_kind", type_=sa.Text(), existing_type=sa.String(32))
    op.drop_constraint(op.f("ck_saga_events_event_type"), "saga_events", type_="check")
    op.alter_column("saga_events", "type", type_=sa.Text(), existing_type=sa.String(32))
    op.add_column(
        "sagas",
        sa.Column("inflight_probe", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("sagas", sa.Column("inflight_service", sa.Text(), nullable=True))
    op.add_column("sagas", sa.Column("waiting_on", sa.Text(), nullable=True))
    op.execute(
        "UPDATE sagas SET waiting_on = waiting_reason || ':' || waiting_service "
        "WHERE waiting_reason IS NOT NULL"
    )
    op.create_index(
        "ix_sagas_inflight_service",
        "sagas",
        ["inflight_service"],
        postgresql_where=sa.text("inflight_service IS NOT NULL"),
    )
    op.drop_constraint(op.f("ck_sagas_wait_reason"), "sagas", type_="check")
    op.drop_column("sagas", "waiting_service")
    op.drop_column("sagas", "waiting_reason")
    op.drop_column("saga_steps", "in_flight")
    op.drop_index("ix_service_slots_saga", table_name="service_slots")
    op.drop_index("ix_service_slots_free", table_name="service_slots")
    op.drop_table("service_slots")
