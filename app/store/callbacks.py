"""Callback reports: the one transaction that takes a participant's report.

The token's row is the arbiter (see `CallbackToken`): a report is taken only while the
attempt's wait is neither reported nor closed. The saga's row is locked first, so a
report and the executor's commit that makes the step wait are ordered: a report taken
while the executor holds the saga is seen by the executor after its commit
(`WAKE_IF_REPORTED`), one taken after it makes the released saga due at once.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.views import Reported, ReportOutcome
from app.store.sagas import SAGA_WORK_CHANNEL

FIND = text(
    """
    SELECT t.saga_id, t.step_idx, t.attempt, st.name AS step
      FROM callback_tokens AS t
      JOIN saga_steps AS st ON st.saga_id = t.saga_id AND st.idx = t.step_idx
     WHERE t.token_hash = :hash
    """
)
LOCK_SAGA = text("SELECT id FROM sagas WHERE id = :id FOR UPDATE")
TAKE = text(
    """
    UPDATE callback_tokens SET report = CAST(:report AS jsonb), reported_at = now()
     WHERE token_hash = :hash AND report IS NULL AND closed_at IS NULL
    RETURNING attempt
    """
)
# Taken: a saga released to wait (no owner) is due now; one an executor holds is seen
# by that executor (its next look at the token, or WAKE_IF_REPORTED after its commit).
DUE_NOW = text(
    """
    UPDATE sagas SET due_at = now()
     WHERE id = :id AND lease_owner IS NULL AND due_at IS NOT NULL
    """
)
EVENT = text(
    """
    INSERT INTO saga_events (saga_id, type, step, direction, attempt, message)
    VALUES (:id, 'callback_reported', :step, 'action', :attempt, :message)
    """
)
WAKE = text("SELECT pg_notify(:channel, '')")
AS_STORED = text(
    """
    SELECT report = CAST(:report AS jsonb) AS same, report IS NOT NULL AS reported
      FROM callback_tokens WHERE token_hash = :hash
    """
)


class CallbackStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def report(self, token_hash: str, report: dict[str, Any], message: str) -> Reported:
        """Take `report` for the attempt whose token hashes to `token_hash`, unless its
        wait is over or another report was taken; `message` goes into the history."""
        body = json.dumps(report, separators=(",", ":"))
        async with self.engine.begin() as conn:
            found = (await conn.execute(FIND, {"hash": token_hash})).first()
            if found is None:
                return Reported(ReportOutcome.NOT_FOUND)
            await conn.execute(LOCK_SAGA, {"id": found.saga_id})
            taken = (await conn.execute(TAKE, {"hash": token_hash, "report": body})).first()
            if taken is not None:
                await conn.execute(DUE_NOW, {"id": found.saga_id})
                await conn.execute(
                    EVENT,
                    {
                        "id": found.saga_id,
                        "step": found.step,
                        "attempt": found.attempt,
                        "message": message,
                    },
                )
                await conn.execute(WAKE, {"channel": SAGA_WORK_CHANNEL})
                outcome = ReportOutcome.TAKEN
            else:
                stored = (await conn.execute(AS_STORED, {"hash": token_hash, "report": body})).one()
                if stored.same:
                    outcome = ReportOutcome.REPEATED
                elif stored.reported:
                    outcome = ReportOutcome.DIFFERENT
                else:
                    outcome = ReportOutcome.CLOSED
        return Reported(outcome, found.saga_id, found.step, found.attempt)
