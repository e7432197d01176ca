"""The PostgreSQL server the tests use, and fresh databases copied from a migrated template."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """TEST_DATABASE_URL, else the local server when it answers, else an embedded one.

    SAGA_TEST_EMBEDDED=1 skips the local server, to check the path a machine without
    PostgreSQL takes.
    """
    explicit = os.environ.get("TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if os.environ.get("SAGA_TEST_EMBEDDED") != "1" and _answers(DEFAULT_URL):
        yield DEFAULT_URL
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver  # type: ignore[import-untyped]

    with tempfile.TemporaryDirectory(prefix="saga-test-pg-") as tmp:
        server = pgserver.get_server(tmp, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def with_database(url: str, name: str) -> str:
    """The same server URL, pointing at another database (keeps ?host=… for sockets)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def admin_exec(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


def create_template(url: str) -> str:
    """Create and migrate a template database once per run; returns its name."""
    from app.store.migrate import upgrade

    name = f"saga_tpl_{uuid.uuid4().hex[:10]}"
    admin_exec(url, f'CREATE DATABASE "{name}"')
    upgrade(with_database(url, name))
    return name


def clone(url: str, template: str) -> str:
    name = f"saga_t_{uuid.uuid4().hex[:12]}"
    admin_exec(url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def drop(url: str, name: str) -> None:
    admin_exec(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
