"""Every saga ends: the pivot lock, the crash counter, service versions

Revision ID: 0003_every_saga_ends
Revises: 0002_bulkhead
Create Date: 2026-12-01 09:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_every_saga_ends"
down_revision: str | None = "0002_bulkhead"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sagas",
        sa.Column("pivot_locked", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.add_column(
        "sagas", sa.Column("crashes", sa.SmallInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "services", sa.Column("version", sa.BigInteger(), server_default="1", nullable=False)
    )
    # Sagas whose pivot is already in flight or done keep refusing a cancel.
    op.execute(
        """
        UPDATE sagas AS s SET pivot_locked = true
          FROM definitions AS d, saga_steps AS st
         WHERE d.id = s.definition_id AND st.saga_id = s.id
           AND st.status IN ('running', 'succeeded')
           AND coalesce((d.spec -> 'steps' -> st.idx ->> 'pivot')::boolean, false)
        """
    )
    # A terminal saga is never due (it once could be left due after a claim).
    op.execute(
        "UPDATE sagas SET due_at = NULL, lease_owner = NULL, lease_expires_at = NULL "
        "WHERE status IN ('compensated', 'failed') AND due_at IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_column("services", "version")
    op.drop_column("sagas", "crashes")
    op.drop_column("sagas", "pivot_locked")
