"""Small helpers for the engine integration tests: register, start, inspect."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tests.conftest import wait_terminal
from tests.support.servers import Received

TERMINAL = ("completed", "compensated", "failed")


def fast_retry(max_attempts: int = 3, **extra: Any) -> dict[str, Any]:
    """A retry policy with tiny, deterministic intervals."""
    policy: dict[str, Any] = {
        "max_attempts": max_attempts,
        "initial_interval_seconds": 0.05,
        "backoff_coefficient": 1.0,
        "max_interval_seconds": 0.2,
        "jitter": False,
    }
    policy.update(extra)
    return policy


def step(
    name: str,
    path: str | None = None,
    *,
    service: str = "svc",
    method: str = "POST",
    compensate: bool = True,
    body: Any = None,
    compensation_body: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A step calling `service` at `path` (default /<name>), compensated at <path>/undo."""
    path = path or f"/{name}"
    spec: dict[str, Any] = {
        "name": name,
        "action": {"service": service, "path": path, "method": method, "body": body},
        "retry": fast_retry(),
        "compensation_retry": fast_retry(),
    }
    if compensate:
        spec["compensation"] = {
            "service": service,
            "path": f"{path}/undo",
            "body": compensation_body if compensation_body is not None else {"saga": "${saga.id}"},
        }
    spec.update(extra)
    return spec


async def put_service(
    client: httpx.AsyncClient, base_url: str, name: str = "svc", **extra: Any
) -> None:
    r = await client.put(f"/v1/services/{name}", json={"base_url": base_url, **extra})
    assert r.status_code in (200, 201), r.text


async def define(
    client: httpx.AsyncClient, name: str, steps: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    r = await client.post("/v1/definitions", json={"name": name, "steps": steps, **extra})
    assert r.status_code in (200, 201), r.text
    return r.json()


async def start(
    client: httpx.AsyncClient,
    definition: str,
    input: Any = None,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    hdrs = dict(headers or {})
    if key is not None:
        hdrs["Idempotency-Key"] = key
    body: dict[str, Any] = {"definition": definition}
    if input is not None:
        body["input"] = input
    r = await client.post("/v1/sagas", json=body, headers=hdrs)
    assert r.status_code == 201, r.text
    return r.json()


async def run(
    client: httpx.AsyncClient,
    definition: str,
    input: Any = None,
    seconds: float = 60,
    **kwargs: Any,
) -> dict[str, Any]:
    """Start a saga and long-poll it to a terminal state."""
    saga = await start(client, definition, input, **kwargs)
    return await wait_terminal(client, saga["id"], seconds=seconds)


async def get_saga(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sagas/{saga_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def events(client: httpx.AsyncClient, saga_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/sagas/{saga_id}/events", params={"limit": 500})
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["next_cursor"] is None
    return page["items"]


def step_of(saga: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [s for s in saga["steps"] if s["name"] == name]
    return found


def keys(calls: list[Received]) -> list[str]:
    return [c.headers.get("idempotency-key", "") for c in calls]


def paths(calls: list[Received]) -> list[str]:
    return [c.path for c in calls]


async def query(db_url: str, sql: str, params: dict[str, Any] | None = None) -> list[dict]:
    """Run one read-only statement against the test database; rows as dicts."""
    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row) as conn:
        cur = await conn.execute(sql, params or {})  # type: ignore[arg-type]
        return list(await cur.fetchall())


async def wait_until(predicate: Any, seconds: float = 20, what: str = "condition") -> None:
    """Poll a sync or async predicate until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"{what} not reached within {seconds}s")
        await asyncio.sleep(0.05)
