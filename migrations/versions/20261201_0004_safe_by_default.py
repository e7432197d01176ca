"""Safe by default: revocable dashboard sessions, an index for cheap metrics

Revision ID: 0004_safe_by_default
Revises: 0003_every_saga_ends
Create Date: 2026-12-01 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_safe_by_default"
down_revision: str | None = "0003_every_saga_ends"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_sessions",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("client", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_sessions")),
    )
    op.create_index("ix_admin_sessions_expires", "admin_sessions", ["expires_at"])
    op.create_index(
        "ix_sagas_active",
        "sagas",
        ["definition_name", "status"],
        postgresql_where=sa.text("status IN ('running', 'compensating')"),
    )


def downgrade() -> None:
    op.drop_index("ix_sagas_active", table_name="sagas")
    op.drop_index("ix_admin_sessions_expires", table_name="admin_sessions")
    op.drop_table("admin_sessions")
