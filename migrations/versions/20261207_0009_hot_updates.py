"""Hot-path storage: room for HOT updates, no per-event foreign-key check

Revision ID: 0009_hot_updates
Revises: 0008_notifications
Create Date: 2026-12-07 23:40:00

A saga row is updated at every step and its step rows at every attempt. An update that
changes no indexed column and finds room on its page is a HOT update: no new entry in
any of the saga table's eleven indexes. `fillfactor` leaves that room on new pages
(existing pages are not rewritten). The history (`saga_events`, about eight rows a saga)
no longer has a foreign key to `sagas`: each insert ran a `SELECT … FOR KEY SHARE` on the
saga row, whose lock marker dirtied the row again. Events are only written by the
statements that update their saga, fenced by its lease, and retention deletes a saga's
events with it in one statement, so the key checked nothing those do not already hold.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_hot_updates"
down_revision: str | None = "0008_notifications"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE sagas SET (fillfactor = 70)")
    op.execute("ALTER TABLE saga_steps SET (fillfactor = 70)")
    op.drop_constraint(op.f("fk_saga_events_saga_id_sagas"), "saga_events", type_="foreignkey")


def downgrade() -> None:
    op.execute(
        "DELETE FROM saga_events AS e WHERE NOT EXISTS (SELECT 1 FROM sagas WHERE id = e.saga_id)"
    )
    op.create_foreign_key(
        op.f("fk_saga_events_saga_id_sagas"),
        "saga_events",
        "sagas",
        ["saga_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.execute("ALTER TABLE saga_steps RESET (fillfactor)")
    op.execute("ALTER TABLE sagas RESET (fillfactor)")
