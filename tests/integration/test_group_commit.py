"""Group commit on a real server: statements that arrive while a batch is in flight go
together in one transaction; a statement the server refuses fails alone; a connection
lost under a batch fails every member without running any of them again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import AsyncRawCursor
from psycopg_pool import AsyncConnectionPool

from app.store.group_commit import GroupCommit
from app.store.pool import open_pool

INSERT = "INSERT INTO gc_rows (n) VALUES ($1) RETURNING n, txid_current() AS xid"
SLOW = "INSERT INTO gc_rows (n) SELECT $1 FROM pg_sleep(0.3) RETURNING n, txid_current() AS xid"
BAD = "INSERT INTO gc_rows (n) VALUES (1 / ($1 - $1)) RETURNING n, txid_current() AS xid"


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(db_url, 4)
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE gc_rows (n integer PRIMARY KEY)")
    yield pool
    await pool.close()


def writer(pool: AsyncConnectionPool) -> GroupCommit:
    async def get() -> AsyncConnectionPool:
        return pool

    async def alone(text: str, args: tuple[Any, ...]) -> Any:
        async with pool.connection() as conn, AsyncRawCursor(conn) as cur:
            await cur.execute(text, args)
            return await cur.fetchone()

    return GroupCommit(get, alone)


async def stored(pool: AsyncConnectionPool) -> list[int]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT n FROM gc_rows ORDER BY n")
        return [r[0] for r in await cur.fetchall()]


async def test_statements_that_wait_go_in_one_transaction(pool: AsyncConnectionPool) -> None:
    group = writer(pool)
    first = asyncio.create_task(group.run(INSERT, (0,)))
    await asyncio.sleep(0)  # the writer takes it alone
    rows = await asyncio.gather(first, *(group.run(INSERT, (n,)) for n in range(1, 10)))
    assert [r[0] for r in rows] == list(range(10))
    # The nine that queued while the first was in flight shared one transaction.
    assert group.batches == 1
    assert len({r[1] for r in rows[1:]}) == 1 and rows[0][1] != rows[1][1]
    assert await stored(pool) == list(range(10))
    await group.close()


async def test_a_refused_statement_fails_alone(pool: AsyncConnectionPool) -> None:
    group = writer(pool)
    calls = [group.run(INSERT, (100,))]
    calls += [group.run(BAD if n == 3 else INSERT, (n,)) for n in range(6)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[4], psycopg.errors.DivisionByZero)
    assert [r[0] for i, r in enumerate(results) if i != 4] == [100, 0, 1, 2, 4, 5]
    assert group.batches == 0  # the batch was refused and rolled back; each ran alone
    assert await stored(pool) == [0, 1, 2, 4, 5, 100]


async def test_a_lost_connection_fails_the_batch_and_runs_nothing_again(
    pool: AsyncConnectionPool,
) -> None:
    """The batch's backend is terminated while it runs: no member is run again (whether
    it committed would be unknown), every member sees the error, nothing is stored."""
    group = writer(pool)
    batch = [asyncio.create_task(group.run(SLOW, (n,))) for n in (2, 3, 4)]
    async with pool.connection() as conn:
        for _ in range(50):
            await asyncio.sleep(0.05)
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND query LIKE '%pg_sleep%'"
                " AND datname = current_database()"
            )
            if await cur.fetchall():
                break
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(r, psycopg.OperationalError) for r in results), results
    assert len({id(r) for r in results}) == 1  # one failure, shared: nothing ran again
    assert group.batches == 0
    assert await stored(pool) == []
