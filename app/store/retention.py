"""Retention: deleting sagas that finished long enough ago, with everything of theirs.

A saga is deleted once it is terminal, no executor holds or expects it (`due_at` and
`lease_owner` empty), it finished before the cutoff, it has no open dead letter (an
operator may still retry that one) and no completion notification still pending. With it
go its steps, its events, its resolved dead letters, its notification (ON DELETE
CASCADE) and the idempotency key that started it (when the key still points at it).
The audit log is kept: it records what people did, not what sagas did.

Work is done in small batches, one transaction each, with a pause between them. The
victims are chosen with FOR UPDATE SKIP LOCKED on the finished-sagas index; the claim
only looks at due sagas and skips locked rows, and readers never wait for row locks, so
a pass blocks neither the executors nor the long-polls. One pass at a time runs across
all processes (a session advisory lock); a process that finds it taken does nothing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.views import Pruned

PRUNE_LOCK = 7_302_114_552  # arbitrary, stable advisory lock id (migrations use ...551)
DEFAULT_BATCH = 200
DEFAULT_PAUSE_SECONDS = 0.05

_CUTOFF = text("SELECT now() - make_interval(secs => :age) AS cutoff")

_VICTIMS = """
SELECT s.id, s.idempotency_key
  FROM sagas AS s
 WHERE s.finished_at < :cutoff
   AND s.status IN ('completed', 'compensated', 'failed')
   AND s.due_at IS NULL AND s.lease_owner IS NULL
   AND NOT EXISTS (SELECT 1 FROM dead_letters AS d
                    WHERE d.saga_id = s.id AND d.status = 'open')
   AND NOT EXISTS (SELECT 1 FROM notifications AS n
                    WHERE n.saga_id = s.id AND n.status = 'pending')
"""

_COUNTS = """
SELECT (SELECT count(*) FROM {sagas}) AS sagas,
       (SELECT count(*) FROM {saga_steps}) AS saga_steps,
       (SELECT count(*) FROM {saga_events}) AS saga_events,
       (SELECT count(*) FROM {idempotency_keys}) AS idempotency_keys,
       (SELECT count(*) FROM {dead_letters}) AS dead_letters
"""

# One batch: the oldest finished sagas nobody holds, each deleted with its rows.
_BATCH = text(
    f"""
    WITH victims AS (
      {_VICTIMS}
       ORDER BY s.finished_at
       LIMIT :batch
         FOR UPDATE OF s SKIP LOCKED
    ), keys AS (
      DELETE FROM idempotency_keys AS k USING victims AS v
       WHERE k.key = v.idempotency_key AND k.saga_id = v.id RETURNING 1
    ), letters AS (
      DELETE FROM dead_letters AS d USING victims AS v WHERE d.saga_id = v.id RETURNING 1
    ), events AS (
      DELETE FROM saga_events AS e USING victims AS v WHERE e.saga_id = v.id RETURNING 1
    ), steps AS (
      DELETE FROM saga_steps AS st USING victims AS v WHERE st.saga_id = v.id RETURNING 1
    ), gone AS (
      DELETE FROM sagas AS s USING victims AS v WHERE s.id = v.id RETURNING 1
    )
    {
        _COUNTS.format(
            sagas="gone",
            saga_steps="steps",
            saga_events="events",
            idempotency_keys="keys",
            dead_letters="letters",
        )
    }
    """
)

# What a pass would delete now, read only.
_DRY = text(
    f"""
    WITH victims AS ({_VICTIMS})
    {
        _COUNTS.format(
            sagas="victims",
            saga_steps="saga_steps AS st JOIN victims AS v ON st.saga_id = v.id",
            saga_events="saga_events AS e JOIN victims AS v ON e.saga_id = v.id",
            idempotency_keys="idempotency_keys AS k JOIN victims AS v "
            "ON k.key = v.idempotency_key AND k.saga_id = v.id",
            dead_letters="dead_letters AS d JOIN victims AS v ON d.saga_id = v.id",
        )
    }
    """
)


def _pruned(row: object) -> Pruned:
    return Pruned(*(int(getattr(row, name)) for name in Pruned.__slots__))


class Retention:
    """One retention pass at a time, across every process that shares the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        batch: int = DEFAULT_BATCH,
        pause_seconds: float = DEFAULT_PAUSE_SECONDS,
    ) -> None:
        self.engine = engine
        self.batch = batch
        self.pause_seconds = pause_seconds

    async def dry_run(self, older_than_seconds: float) -> Pruned:
        """What `prune` would delete now, by table."""
        async with self.engine.connect() as conn:
            cutoff = await _cutoff(conn, older_than_seconds)
            row = (await conn.execute(_DRY, {"cutoff": cutoff})).one()
        return _pruned(row)

    async def prune(self, older_than_seconds: float) -> Pruned | None:
        """Delete what finished more than `older_than_seconds` ago, batch by batch; None
        when another process is pruning now. The cutoff is fixed when the pass starts."""
        async with self.engine.connect() as conn:
            locked = (
                await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK})
            ).scalar_one()
            await conn.commit()
            if not locked:
                return None
            try:
                return await self._batches(conn, await _cutoff(conn, older_than_seconds))
            finally:
                await _unlock(conn)

    async def _batches(self, conn: AsyncConnection, cutoff: datetime) -> Pruned:
        total = Pruned()
        while True:
            row = (await conn.execute(_BATCH, {"cutoff": cutoff, "batch": self.batch})).one()
            await conn.commit()
            done = _pruned(row)
            total += done
            if done.sagas < self.batch:
                return total
            await asyncio.sleep(self.pause_seconds)


async def _cutoff(conn: AsyncConnection, older_than_seconds: float) -> datetime:
    cutoff: datetime = (await conn.execute(_CUTOFF, {"age": older_than_seconds})).scalar_one()
    await conn.commit()
    return cutoff


async def _unlock(conn: AsyncConnection) -> None:
    """Give the lock back; a connection that cannot is dropped (which releases it) rather
    than returned to the pool still holding it."""
    try:
        await conn.rollback()
        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK})
        await conn.commit()
    except BaseException:
        await conn.invalidate()
        raise
