"""A history of finished sagas, bulk-inserted with generate_series (the history scenario).

The rows are clones of one real saga the service completed on this database, so they
match the schema whatever the current migration is: every column of `sagas` and of each
table with a `saga_id` column (saga_steps, saga_events, ...) is copied from the template
row, except

- the saga's id (`md5('bench-history-' || g)::uuid`, the same in every table),
- `status` = 'completed' and `due_at` = NULL (finished sagas leave the due index),
- `idempotency_key` = 'history-' || g (their idempotency_keys rows expired long ago),
- identity and generated columns (left to the database),
- every timestamptz, moved back so the history spans the 30 days before the template,
  oldest first in insertion (and so physical and event-id) order.

The loader inserts on several connections at once, skips foreign-key triggers (the
rows are consistent by construction) and drops the tables' secondary indexes first,
building them again after the insert (indexes behind constraints stay). Then VACUUM
ANALYZE and CHECKPOINT, so the measurement window pays neither the autovacuum of fresh
rows nor the flush of the load.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import psycopg
from psycopg import sql

SPAN_MS = 30 * 24 * 3600 * 1000
SKIP_TABLES = {"idempotency_keys"}  # keyed by the idempotency key: expired for old sagas
# The loader's commits need not wait for the disk (the server keeps fsync on); its rows
# are consistent by construction, so foreign-key triggers may sleep.
LOADER_SETTINGS = (
    "SET synchronous_commit = off; SET session_replication_role = replica;"
    " SET maintenance_work_mem = '512MB'"
)


def _columns(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str, bool]]:
    rows = conn.execute(
        """
        SELECT column_name, data_type, is_identity = 'YES' OR is_generated = 'ALWAYS'
          FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = %s
         ORDER BY ordinal_position
        """,
        (table,),
    ).fetchall()
    return [(str(r[0]), str(r[1]), bool(r[2])) for r in rows]


def _child_tables(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        """
        SELECT table_name FROM information_schema.columns
         WHERE table_schema = current_schema() AND column_name = 'saga_id'
         ORDER BY table_name
        """
    ).fetchall()
    return [str(r[0]) for r in rows if str(r[0]) not in SKIP_TABLES]


def _clone(conn: psycopg.Connection[Any], table: str, key: str) -> sql.Composed:
    """INSERT INTO table SELECT <template row, mapped> FROM table, generate_series."""
    new_id = sql.SQL("md5('bench-history-' || g)::uuid")
    shift = sql.SQL("(interval '1 millisecond' * ((%(count)s - g + 1) * %(step_ms)s))")
    names: list[sql.Composable] = []
    values: list[sql.Composable] = []
    order: list[sql.Composable] = [sql.SQL("g")]
    for name, data_type, generated in _columns(conn, table):
        if generated:
            order.append(sql.SQL("t.") + sql.Identifier(name))  # e.g. event ids, in order
            continue
        column = sql.SQL("t.") + sql.Identifier(name)
        value: sql.Composable = column
        if name == key:
            value = new_id
        elif table == "sagas" and name == "status":
            value = sql.Literal("completed")
        elif table == "sagas" and name == "due_at":
            value = sql.NULL
        elif table == "sagas" and name == "idempotency_key":
            value = sql.SQL("'history-' || g")
        elif data_type == "timestamp with time zone":
            value = sql.SQL("{} - {}").format(column, shift)
        names.append(sql.Identifier(name))
        values.append(value)
    return sql.SQL(
        "INSERT INTO {table} ({names}) SELECT {values}"
        " FROM {table} t, generate_series(%(low)s::bigint, %(high)s::bigint) g"
        " WHERE t.{key} = %(template)s ORDER BY {order}"
    ).format(
        table=sql.Identifier(table),
        names=sql.SQL(", ").join(names),
        values=sql.SQL(", ").join(values),
        key=sql.Identifier(key),
        order=sql.SQL(", ").join(order),
    )


def template_saga(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT id FROM sagas WHERE status = 'completed' ORDER BY created_at LIMIT 1"
        ).fetchone()
    if row is None:
        raise RuntimeError("no completed saga to use as the history's template")
    return str(row[0])


async def _insert(
    url: str,
    statements: dict[str, sql.Composed],
    jobs: list[tuple[str, dict[str, Any]]],
    workers: int,
) -> dict[str, int]:
    """Run the (table, batch) inserts on `workers` connections at once, each its own
    transaction: with no foreign-key triggers, their order does not matter."""
    rows: dict[str, int] = {}
    queue = list(jobs)

    async def worker() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(LOADER_SETTINGS)
            while queue:
                table, params = queue.pop(0)
                cur = await conn.execute(statements[table], params)
                rows[table] = rows.get(table, 0) + max(cur.rowcount, 0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return rows


def load(url: str, count: int, batch: int = 100_000) -> dict[str, Any]:
    """Insert `count` finished sagas cloned from a completed one; returns what was done."""
    template = template_saga(url)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LOADER_SETTINGS)
        tables = ["sagas", *(t for t in _child_tables(conn) if t != "sagas")]
        statements = {t: _clone(conn, t, "id" if t == "sagas" else "saga_id") for t in tables}
        # Secondary indexes are built once after the load, which is faster than row by row;
        # those behind constraints (primary keys, unique) stay.
        indexes = conn.execute(
            """
            SELECT x.relname, pg_get_indexdef(i.indexrelid)
              FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                   JOIN pg_class x ON x.oid = i.indexrelid
             WHERE t.relname = ANY(%s) AND t.relnamespace = current_schema()::regnamespace
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
            """,
            (tables,),
        ).fetchall()
        for name, _ in indexes:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
        shared = {"count": count, "step_ms": SPAN_MS // max(count, 1), "template": template}
        jobs = [
            (table, {**shared, "low": low, "high": min(count, low + batch - 1)})
            for low in range(1, count + 1, batch)
            for table in tables
        ]
        rows = asyncio.run(_insert(url, statements, jobs, workers=min(4, os.cpu_count() or 2)))
        inserted = time.monotonic()
        for _, definition in indexes:
            conn.execute(definition)
        indexed = time.monotonic()
        for table in tables:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
        conn.execute("CHECKPOINT")
    done = time.monotonic()
    return {
        "template_saga": template,
        "rows": rows,
        "secondary_indexes_rebuilt": [name for name, _ in indexes],
        "insert_seconds": round(inserted - started, 1),
        "index_seconds": round(indexed - inserted, 1),
        "vacuum_checkpoint_seconds": round(done - indexed, 1),
    }
