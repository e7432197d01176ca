"""Count in-flight calls by lease, and record why a saga waits

Revision ID: 0002_bulkhead
Revises: 0001_initial
Create Date: 2026-11-27 23:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_bulkhead"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sagas", sa.Column("inflight_service", sa.Text(), nullable=True))
    op.add_column(
        "sagas",
        sa.Column("inflight_probe", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column("sagas", sa.Column("waiting_on", sa.Text(), nullable=True))
    op.create_index(
        "ix_sagas_inflight_service",
        "sagas",
        ["inflight_service"],
        unique=False,
        postgresql_where=sa.text("inflight_service IS NOT NULL"),
    )
    op.drop_column("circuit_breakers", "in_flight")
    op.drop_column("circuit_breakers", "half_open_in_flight")


def downgrade() -> None:
    op.add_column(
        "circuit_breakers",
        sa.Column("half_open_in_flight", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "circuit_breakers",
        sa.Column("in_flight", sa.Integer(), server_default="0", nullable=False),
    )
    op.drop_index(
        "ix_sagas_inflight_service",
        table_name="sagas",
        postgresql_where=sa.text("inflight_service IS NOT NULL"),
    )
    op.drop_column("sagas", "waiting_on")
    op.drop_column("sagas", "inflight_probe")
    op.drop_column("sagas", "inflight_service")
