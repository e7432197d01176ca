"""Group commit: many sagas' outcome statements in one transaction and one round trip.

Every saga task hands its outcome statement to one writer and waits. While the writer has
a batch in flight, the statements that arrive queue; when it is back, it sends all of
them at once (psycopg's pipeline mode: one write, one read) inside one transaction: one
commit and one WAL flush for the batch instead of one each. A lone statement is sent as
before (autocommit), so one saga at a time waits for nothing.

Each statement keeps its own guards (fence, status, cancel) and never needs another's
effects. The statements of a batch touch different sagas; the rows they may share (a
service's bulkhead slots) are taken with SKIP LOCKED, and a later statement of the same
transaction sees an earlier one's slot as held. When the batch fails as a whole (one
statement's error aborts the transaction: nothing of it was written), each statement is
run again alone, so one bad statement fails only its own saga. A connection lost during
the batch's COMMIT leaves every member's outcome unknown, as a lost autocommit does for
one: each saga's lease expires and its next owner judges the attempt cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncRawCursor
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool

MAX_BATCH = 64  # statements in one transaction at most

Run = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class GroupCommit:
    """One writer for one statement text (the outcome commit), on `pool`."""

    def __init__(self, pool: Callable[[], Awaitable[AsyncConnectionPool]], alone: Run) -> None:
        self._pool = pool
        self._alone = alone  # one statement in autocommit: its first row, or None
        self._queue: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # counted for the tests: batches of more than one statement

    async def run(self, text: str, args: tuple[Any, ...]) -> Any:
        """Apply the statement (in a batch when others wait too); its first row."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((text, args, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="group-commit")
        return await future

    async def close(self) -> None:
        """Let the writer finish what is queued."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer

    async def _write(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._apply(batch)
                except BaseException as exc:  # cancelled: whether it was written is unknown
                    _fail(batch, exc if isinstance(exc, Exception) else RuntimeError(exc))
                    raise
        finally:
            self._writer = None
            _fail(self._queue, RuntimeError("the group commit writer stopped"))
            self._queue = []

    async def _apply(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        if len(batch) > 1:
            try:
                rows = await self._together([(text, args) for text, args, _ in batch])
            except _Refused:
                pass  # nothing of the batch was written: each runs alone below
            except Exception as exc:
                # The connection failed: whether the batch committed is unknown, as for
                # a lost autocommit; running it again could apply it twice.
                _fail(batch, exc)
                return
            else:
                self.batches += 1
                for (_text, _args, future), row in zip(batch, rows, strict=True):
                    if not future.done():
                        future.set_result(row)
                return
        for text, args, future in batch:
            try:
                row = await self._alone(text, args)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(row)

    async def _together(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        pool = await self._pool()
        async with pool.connection() as conn:
            cursors = [AsyncRawCursor(conn, row_factory=namedtuple_row) for _ in statements]
            try:
                async with conn.pipeline(), conn.transaction():
                    for cursor, (text, args) in zip(cursors, statements, strict=True):
                        await cursor.execute(text, args)
                return [await cursor.fetchone() for cursor in cursors]
            except psycopg.Error as exc:
                if conn.broken or conn.closed:
                    raise
                # The server refused a statement and the transaction was rolled back on a
                # connection that still works: nothing of the batch was written.
                raise _Refused from exc
            finally:
                for cursor in cursors:
                    await cursor.close()


class _Refused(Exception):
    """The server refused the batch and rolled it back; the connection is fine."""


def _fail(batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]], exc: Exception) -> None:
    for _text, _args, future in batch:
        if not future.done():
            future.set_exception(exc)
