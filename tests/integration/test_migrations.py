"""Alembic migrations: from an empty database to head, down to base and up again, and
the migrated schema is exactly the models'. /readyz tells migrated from unmigrated."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, pool, text

from app.settings import sqlalchemy_url
from app.store.migrate import current_revision, downgrade, head_revision, upgrade
from app.store.tables import Base
from tests.conftest import make_settings
from tests.support import pg
from tests.support.api_helpers import assert_problem, client_for


@pytest.fixture
def empty_db(pg_url: str) -> Iterator[str]:
    """A brand-new database with nothing in it (not a copy of the migrated template)."""
    name = f"saga_m_{uuid.uuid4().hex[:12]}"
    pg.admin_exec(pg_url, f'CREATE DATABASE "{name}"')
    try:
        yield pg.with_database(pg_url, name)
    finally:
        pg.drop(pg_url, name)


@pytest.fixture
def sync_engine(empty_db: str) -> Iterator[Engine]:
    engine = create_engine(sqlalchemy_url(empty_db), poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return current_revision(conn)


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _leftovers(engine: Engine) -> dict[str, list[str]]:
    """Everything user-made in the public schema, by kind."""
    queries = {
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        "views": "SELECT viewname FROM pg_views WHERE schemaname = 'public'",
        "sequences": "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'",
        "types": """
            SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'r')
        """,
        "functions": """
            SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public'
        """,
    }
    with engine.connect() as conn:
        return {k: sorted(r[0] for r in conn.execute(text(q))) for k, q in queries.items()}


def test_head_exists() -> None:
    head = head_revision()
    assert head, "no migration scripts found"


def test_upgrade_head_on_empty_database(empty_db: str, sync_engine: Engine) -> None:
    assert _revision(sync_engine) is None
    upgrade(empty_db)
    assert _revision(sync_engine) == head_revision()
    tables = set(inspect(sync_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    # Upgrading again is a no-op.
    upgrade(empty_db)
    assert _revision(sync_engine) == head_revision()


def test_migrated_schema_equals_models(empty_db: str, sync_engine: Engine) -> None:
    upgrade(empty_db)
    diff = _schema_diff(sync_engine)
    assert diff == [], "\n".join(map(str, diff))


def test_downgrade_to_base_and_up_again(empty_db: str, sync_engine: Engine) -> None:
    upgrade(empty_db)
    downgrade(empty_db, "base")
    assert _revision(sync_engine) is None
    left = _leftovers(sync_engine)
    assert left["tables"] == ["alembic_version"], left
    assert left == {
        "tables": ["alembic_version"],
        "views": [],
        "sequences": [],
        "types": [],
        "functions": [],
    }

    upgrade(empty_db)
    assert _revision(sync_engine) == head_revision()
    assert _schema_diff(sync_engine) == []


def test_concurrent_upgrades_are_serialised(empty_db: str, sync_engine: Engine) -> None:
    """Several processes migrating one database at once (as `serve` does) all succeed."""
    code = "import sys; from app.store.migrate import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_db], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert _revision(sync_engine) == head_revision()
    assert _schema_diff(sync_engine) == []


async def test_readyz_on_migrated_database(db_url: str) -> None:
    async with client_for(make_settings(), db_url) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "ready", "schema": head_revision()}


async def test_readyz_on_unmigrated_database(empty_db: str) -> None:
    async with client_for(make_settings(), empty_db) as client:
        r = await client.get("/readyz")
        problem = assert_problem(r, 503)
        assert r.headers.get("retry-after")
        assert "Traceback" not in r.text
        assert problem["detail"]
        # The process itself is alive.
        assert (await client.get("/healthz")).status_code == 200


async def test_readyz_after_downgrade_to_base(empty_db: str) -> None:
    upgrade(empty_db)
    downgrade(empty_db, "base")
    async with client_for(make_settings(), empty_db) as client:
        assert_problem(await client.get("/readyz"), 503)
    upgrade(empty_db)
    async with client_for(make_settings(), empty_db) as client:
        r = await client.get("/readyz")
        assert r.status_code == 200, r.text


async def test_readyz_behind_head(empty_db: str) -> None:
    """A database at an older revision is not ready (only when there is an older one)."""
    script_revisions = _all_revisions()
    if len(script_revisions) < 2:
        upgrade(empty_db)
        expected = 200
    else:
        upgrade(empty_db, script_revisions[-2])
        expected = 503
    async with client_for(make_settings(), empty_db) as client:
        r = await client.get("/readyz")
        assert r.status_code == expected, r.text
        if expected == 503:
            assert_problem(r, 503)


def _all_revisions() -> list[str]:
    """Revision ids from base to head."""
    from app.store.migrate import script_directory

    with script_directory() as script:
        return [s.revision for s in reversed(list(script.walk_revisions()))]


def test_database_url_forms(empty_db: str) -> None:
    """Both URL forms of the contract migrate."""
    plus = empty_db.replace("postgresql://", "postgresql+psycopg://", 1)
    upgrade(plus)
    engine = create_engine(sqlalchemy_url(empty_db), poolclass=pool.NullPool)
    try:
        assert _revision(engine) == head_revision()
    finally:
        engine.dispose()


async def test_api_on_unmigrated_database_is_not_a_stack_trace(empty_db: str) -> None:
    async with client_for(make_settings(), empty_db) as client:
        r = await client.get("/v1/services")
        assert r.status_code >= 400
        assert_problem(r)
        assert "relation" not in r.text and "Traceback" not in r.text
