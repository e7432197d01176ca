"""Database connections: the async engine, and the embedded PostgreSQL default."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings, sqlalchemy_url

log = logging.getLogger(__name__)


@dataclass
class Database:
    """Where the database is, and the embedded server to stop on exit (if any)."""

    url: str
    embedded: Any = None

    def close(self) -> None:
        if self.embedded is not None:
            log.info("stopping embedded PostgreSQL")
            self.embedded.cleanup()
            self.embedded = None


def open_database(settings: Settings) -> Database:
    """Use DATABASE_URL, or start an embedded PostgreSQL in SAGA_DATA_DIR."""
    if settings.database_url:
        return Database(url=settings.database_url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver
    except ImportError as exc:  # pragma: no cover - depends on the Python version
        raise SystemExit(
            "DATABASE_URL is not set and the embedded PostgreSQL (pgserver) is not available "
            "on this Python; set DATABASE_URL to a PostgreSQL server."
        ) from exc
    data_dir = Path(settings.data_dir).resolve() / "pgdata"
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL", extra={"data_dir": str(data_dir)})
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # "stop" stops the server on exit but keeps the data for the next start.
    server = pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
    return Database(url=server.get_uri(), embedded=server)


def make_engine(
    url: str, pool_size: int = 10, idle_in_transaction_seconds: float | None = None
) -> AsyncEngine:
    """The pooled engine. With `idle_in_transaction_seconds`, PostgreSQL ends a session
    that sits that long inside a transaction: a process frozen mid-transaction (SIGSTOP,
    a paused VM) would otherwise keep its row locks, and since claims skip locked rows,
    its sagas could not be taken over when their leases expire."""
    connect_args: dict[str, Any] = {}
    if idle_in_transaction_seconds:
        timeout_ms = max(1, round(idle_in_transaction_seconds * 1000))
        given = make_url(sqlalchemy_url(url)).query.get("options")  # keep the URL's own
        given = given[-1] if isinstance(given, tuple) else given
        option = f"-c idle_in_transaction_session_timeout={timeout_ms}"
        connect_args["options"] = f"{given} {option}" if given else option
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args=connect_args,
        # Statement parameters carry service headers, inputs and answers: never in an
        # error message (which may be logged).
        hide_parameters=True,
    )
