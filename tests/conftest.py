"""Shared fixtures: a real PostgreSQL database per test, the orchestrator served over
real HTTP in this event loop, and scripted participant services."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.support import leftovers, pg
from tests.support.servers import Participant, serve

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with pg.server_url() as url:
        yield url


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> Iterator[str]:
    name = pg.create_template(pg_url)
    yield name
    pg.drop(pg_url, name)


@pytest.fixture
def db_url(pg_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = pg.clone(pg_url, template_db)
    yield pg.with_database(pg_url, name)
    pg.drop(pg_url, name)


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: fast polling, short leases, the test admin token."""
    values: dict[str, Any] = {
        "SAGA_ADMIN_TOKEN": ADMIN_TOKEN,
        "SAGA_LOG_FORMAT": "console",
        "SAGA_POLL_INTERVAL": 0.2,
        "SAGA_LEASE_SECONDS": 3,
        "SAGA_SHUTDOWN_GRACE": 2,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture
async def orchestrator(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """API + executor in one app (like `serve`), reached over real HTTP."""
    app = create_app(make_settings(), db_url, run_executor=True)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
        yield client


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API alone (no executor): sagas stay where they are put."""
    app = create_app(make_settings(), db_url, run_executor=False)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
        yield client


@pytest.fixture
async def participant() -> AsyncIterator[Participant]:
    p = Participant()
    async with serve(p.app) as base:
        p.url = base
        yield p


async def wait_terminal(client: httpx.AsyncClient, saga_id: str, seconds: float = 30) -> Any:
    """Long-poll a saga until it is terminal; fail the test if it is not in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        remaining = max(0.1, min(30, deadline - loop.time()))
        r = await client.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": remaining})
        assert r.status_code == 200, r.text
        saga = r.json()
        if saga["status"] in ("completed", "compensated", "failed"):
            return saga
        if loop.time() >= deadline:
            raise AssertionError(f"saga {saga_id} still {saga['status']} after {seconds}s")


def pytest_report_header() -> str:
    return f"TEST_DATABASE_URL={os.environ.get('TEST_DATABASE_URL', '(default)')}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Mark this run's environment, so that whatever it starts can be found at the end."""
    os.environ[leftovers.MARKER] = uuid.uuid4().hex


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when tests left processes behind (then stop them)."""
    marker = os.environ.get(leftovers.MARKER)
    if not marker:
        return
    left = leftovers.wait_gone(marker, exclude={os.getpid()}, seconds=10)
    if not left:
        return
    leftovers.kill(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = "\n".join(f"  pid {p.pid}: {p.args[:200]}" for p in left)
    message = f"the tests left {len(left)} process(es) running (now killed):\n{lines}"
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
