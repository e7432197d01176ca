"""What the checkout participants share.

- a psycopg 3 async connection pool, and their tables created on startup (idempotently);
- `Participant.once`: the effect and its `Idempotency-Key` row in ONE transaction. The
  key row is inserted first (`ON CONFLICT DO NOTHING`); the request that inserted it
  applies the effect and stores its answer, every other request with that key (even
  concurrent ones, which wait on the key's unique index) gets the stored answer back;
- a per-order advisory lock, so an action and its compensation never interleave, and a
  "closed" mark an undo leaves behind, so an action that arrives after its own
  compensation (a slow first attempt) is refused instead of applied for good;
- `POST /_chaos` to make the service fail, slow down or answer 503/429 on demand, and
  `GET /_effects` with its effect counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

Connection = AsyncConnection[tuple[Any, ...]]
# An effect runs inside the key's transaction and answers (status, JSON body).
Effect = Callable[[Connection], Awaitable[tuple[int, dict[str, Any]]]]

DDL_LOCK = "examples.checkout:ddl"


class Chaos(BaseModel):
    """How the service misbehaves; `POST /_chaos {}` makes it healthy again."""

    model_config = ConfigDict(extra="forbid")

    fail_status: int | None = Field(
        default=None, ge=400, le=599, description="answer this status instead of working"
    )
    fail_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of calls that fail (with fail_status)"
    )
    delay_seconds: float = Field(default=0.0, ge=0.0, le=120.0, description="wait before answering")
    retry_after: int | None = Field(
        default=None, ge=0, le=86400, description="Retry-After seconds sent with a failure"
    )


class OrderRef(BaseModel):
    """The body of every compensation: which order to undo."""

    order_ref: str = Field(min_length=1, max_length=255)


class Item(BaseModel):
    sku: str = Field(min_length=1, max_length=100)
    qty: int = Field(ge=1, le=10_000)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return JSONResponse(
        body,
        status_code=status,
        headers=dict(headers or {}),
        media_type="application/problem+json",
    )


_TITLES = {
    400: "Bad Request",
    409: "Conflict",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Participant:
    """One participant service: its schema, pool, chaos settings and effect counters."""

    def __init__(
        self,
        schema: str,
        dsn: str,
        tables: Sequence[str],
        counts: Mapping[str, str],
        pool_size: int = 5,
    ) -> None:
        self.schema = schema
        self.dsn = dsn
        self.tables = tables
        self.counts = counts  # name -> "SELECT count(*) ... %(ref)s" query
        self.pool_size = pool_size
        self.chaos = Chaos()
        self.replays = 0
        self._pool: AsyncConnectionPool[Connection] | None = None
        # Run when the app stops, before the pool closes (background work, clients).
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        ident = sql.Identifier(schema)
        self._claim = sql.SQL(
            "INSERT INTO {}.idempotency (key, fingerprint) VALUES (%s, %s) "
            "ON CONFLICT (key) DO NOTHING RETURNING key"
        ).format(ident)
        self._store = sql.SQL(
            "UPDATE {}.idempotency SET status_code = %s, response = %s WHERE key = %s "
            "RETURNING response"
        ).format(ident)
        self._stored = sql.SQL(
            "SELECT fingerprint, status_code, response FROM {}.idempotency WHERE key = %s"
        ).format(ident)
        self._close = sql.SQL(
            "INSERT INTO {}.closed_orders (order_ref) VALUES (%s) ON CONFLICT DO NOTHING"
        ).format(ident)
        self._is_closed = sql.SQL("SELECT 1 FROM {}.closed_orders WHERE order_ref = %s").format(
            ident
        )

    @property
    def pool(self) -> AsyncConnectionPool[Connection]:
        if self._pool is None:
            raise RuntimeError(f"{self.schema}: the app has not started")
        return self._pool

    # --- lifecycle -----------------------------------------------------------------------

    def create_app(self, title: str, description: str) -> FastAPI:
        """The FastAPI app with lifespan (pool, tables) and the admin endpoints."""

        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
                self.dsn, min_size=1, max_size=self.pool_size, open=False, timeout=30
            )
            await pool.open(wait=True, timeout=30)
            try:
                await self._create_tables(pool)
                self._pool = pool
                yield
            finally:
                for stop in self.on_shutdown:
                    await stop()
                self._pool = None
                await pool.close()

        app = FastAPI(title=title, description=description, lifespan=lifespan)

        @app.post("/_chaos", summary="Make this service fail, slow down or recover")
        async def set_chaos(chaos: Chaos) -> Chaos:
            self.chaos = chaos
            return chaos

        @app.get("/_chaos", summary="How this service misbehaves now")
        async def get_chaos() -> Chaos:
            return self.chaos

        @app.get("/_effects", summary="Effect counts, optionally for one order")
        async def effects(order_ref: str | None = None) -> dict[str, Any]:
            return {
                "service": self.schema,
                "order_ref": order_ref,
                "counts": await self.effect_counts(order_ref),
                "replayed_requests": self.replays,
            }

        return app

    async def _create_tables(self, pool: AsyncConnectionPool[Connection]) -> None:
        ident = sql.Identifier(self.schema)
        statements: list[sql.SQL | sql.Composed] = [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.idempotency ("
                " key text PRIMARY KEY,"
                " fingerprint text NOT NULL,"
                " status_code integer,"
                " response jsonb,"
                " created_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.closed_orders ("
                " order_ref text PRIMARY KEY,"
                " closed_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident),
            *(sql.SQL(statement) for statement in self.tables),
        ]
        async with pool.connection() as conn, conn.transaction():
            # Two processes creating the same tables at once would trip over each other.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
            for statement in statements:
                await conn.execute(statement)

    # --- the idempotent effect -----------------------------------------------------------

    async def once(
        self, request: Request, payload: BaseModel, order_ref: str | None, effect: Effect
    ) -> JSONResponse:
        """Apply `effect` at most once per Idempotency-Key; replay its answer otherwise."""
        refused = await self._misbehave()
        if refused is not None:
            return refused
        key = request.headers.get("idempotency-key", "")
        if not key or len(key) > 255:
            return problem(400, "send an Idempotency-Key header (1-255 characters)")
        fingerprint = hashlib.sha256(
            f"{request.method} {request.url.path} {payload.model_dump_json()}".encode()
        ).hexdigest()
        async with self.pool.connection() as conn, conn.transaction():
            if order_ref is not None:
                await self.lock(conn, order_ref)
            claimed = await (await conn.execute(self._claim, (key, fingerprint))).fetchone()
            if claimed is not None:
                status, body = await effect(conn)
                # Answer what was stored (jsonb's key order), so replays are identical.
                stored = await (
                    await conn.execute(self._store, (status, Jsonb(body), key))
                ).fetchone()
                return JSONResponse(stored[0] if stored else body, status_code=status)
            row = await (await conn.execute(self._stored, (key,))).fetchone()
        if row is None:  # pragma: no cover - the conflicting row was committed
            return problem(500, "idempotency record vanished")
        stored_fingerprint, status, body = row
        if stored_fingerprint != fingerprint:
            return problem(422, "this Idempotency-Key was already used for a different request")
        self.replays += 1
        return JSONResponse(body, status_code=status, headers={"Idempotent-Replayed": "true"})

    async def _misbehave(self) -> JSONResponse | None:
        chaos = self.chaos
        if chaos.delay_seconds > 0:
            await asyncio.sleep(chaos.delay_seconds)
        if chaos.fail_status is not None and random.random() < chaos.fail_rate:
            headers = {} if chaos.retry_after is None else {"Retry-After": str(chaos.retry_after)}
            return problem(
                chaos.fail_status,
                f"{self.schema} fails on purpose (POST /_chaos {{}} to heal it)",
                headers,
            )
        return None

    # --- helpers for effects -------------------------------------------------------------

    async def lock(self, conn: Connection, order_ref: str) -> None:
        """Serialise everything done to one order until the transaction ends."""
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{self.schema}:{order_ref}",)
        )

    async def close_order(self, conn: Connection, order_ref: str) -> None:
        """Remember that this order was undone: a late action for it is refused."""
        await conn.execute(self._close, (order_ref,))

    async def is_closed(self, conn: Connection, order_ref: str) -> bool:
        return await (await conn.execute(self._is_closed, (order_ref,))).fetchone() is not None

    async def effect_counts(self, order_ref: str | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self.pool.connection() as conn:
            for name, query in self.counts.items():
                row = await (await conn.execute(query, {"ref": order_ref})).fetchone()
                counts[name] = int(row[0]) if row else 0
        return counts


def closed_conflict(what: str, order_ref: str) -> tuple[int, dict[str, Any]]:
    """The answer to an action that arrives after its order was undone."""
    return 409, {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": f"order {order_ref} was already undone; not {what} it",
    }
