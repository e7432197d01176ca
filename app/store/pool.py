"""A plain psycopg connection pool for the hot paths (starting and reading sagas, the
executor's claims and commits): no ORM, no per-checkout ping, statements prepared by
psycopg after a few runs. Everything else goes through SQLAlchemy (`db.py`)."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from app.settings import libpq_url


async def _configure(conn: AsyncConnection) -> None:
    await conn.set_autocommit(True)


async def open_pool(
    url: str,
    size: int,
    idle_in_transaction_seconds: float | None = None,
    name: str = "hot",
    wait_seconds: float = 30.0,
) -> AsyncConnectionPool:
    """An open pool of up to `size` connections, in UTC (times are read as UTC). With
    `idle_in_transaction_seconds`, a frozen process's transaction cannot keep its locks
    (see `db.make_engine`). `wait_seconds`: how long a caller waits for a connection (the
    engine uses its lease: past it, the saga is another worker's anyway)."""
    options = "-c timezone=UTC"
    if idle_in_transaction_seconds:
        timeout_ms = max(1, round(idle_in_transaction_seconds * 1000))
        options += f" -c idle_in_transaction_session_timeout={timeout_ms}"
    pool = AsyncConnectionPool(
        libpq_url(url),
        min_size=1,
        max_size=size,
        kwargs={"options": options},
        configure=_configure,
        open=False,
        name=name,
        timeout=wait_seconds,
    )
    await pool.open(wait=True, timeout=30)
    return pool
