"""Business keys, labels and exclusive definitions; indexes for retention

Revision ID: 0006_keys_retention
Revises: 0005_engine_core
Create Date: 2026-12-01 14:00:00

Sagas get a `business_key`, `labels` (jsonb, `{}` when none) and `exclusive` (started
on an exclusive definition). The columns are added without rewriting the table (a
constant default); the indexes are built on columns that are still empty, so they are
small, but building them scans `sagas` once while writes to it wait.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_keys_retention"
down_revision: str | None = "0005_engine_core"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sagas", sa.Column("business_key", sa.Text(), nullable=True))
    op.add_column(
        "sagas",
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "sagas",
        sa.Column("exclusive", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_sagas_exclusive_needs_key"), "sagas", "NOT exclusive OR business_key IS NOT NULL"
    )
    op.create_index(
        "ix_sagas_business_key",
        "sagas",
        ["business_key", sa.text("created_at DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("business_key IS NOT NULL"),
    )
    op.create_index(
        "ix_sagas_labels",
        "sagas",
        ["labels"],
        postgresql_using="gin",
        postgresql_ops={"labels": "jsonb_path_ops"},
    )
    op.create_index(
        "uq_sagas_exclusive",
        "sagas",
        ["definition_name", "business_key"],
        unique=True,
        postgresql_where=sa.text("exclusive AND status IN ('running', 'compensating')"),
    )
    op.create_index(
        "ix_sagas_finished",
        "sagas",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_index("ix_dead_letters_saga", "dead_letters", ["saga_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_saga", table_name="dead_letters")
    op.drop_index("ix_sagas_finished", table_name="sagas")
    op.drop_index("uq_sagas_exclusive", table_name="sagas")
    op.drop_index("ix_sagas_labels", table_name="sagas")
    op.drop_index("ix_sagas_business_key", table_name="sagas")
    op.drop_constraint(op.f("ck_sagas_exclusive_needs_key"), "sagas", type_="check")
    op.drop_column("sagas", "exclusive")
    op.drop_column("sagas", "labels")
    op.drop_column("sagas", "business_key")
