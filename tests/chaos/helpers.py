"""What several chaos tests share, on top of tests.support.crash: starting many sagas at
once, collecting their outcomes and histories in parallel, and reading the database."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import httpx
import psycopg

from tests.support.crash import BAD_DEF, OK_DEF, events_of, wait_all_terminal


async def start_many(
    client: httpx.AsyncClient,
    count: int,
    prefix: str,
    bad_every: int = 2,
    concurrency: int = 16,
    offset: int = 0,
) -> dict[str, str]:
    """Start `count` crash-suite sagas in parallel (every `bad_every`-th one compensates,
    as in tests.support.crash.start_sagas); id -> definition."""
    sagas: dict[str, str] = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        definition = BAD_DEF if bad_every and n % bad_every == 1 else OK_DEF
        async with gate:
            r = await client.post(
                "/v1/sagas",
                json={"definition": definition, "input": {"n": n, "bad": definition == BAD_DEF}},
                headers={"Idempotency-Key": f"{prefix}-{n}"},
            )
        assert r.status_code == 201, r.text
        sagas[r.json()["id"]] = definition

    await asyncio.gather(*(one(n) for n in range(offset, offset + count)))
    return sagas


async def collect(
    client: httpx.AsyncClient, sagas: Iterable[str], seconds: float, concurrency: int = 16
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Wait until every saga is terminal, then read every history."""
    ids = list(sagas)
    final = await wait_all_terminal(client, ids, seconds)
    gate = asyncio.Semaphore(concurrency)
    histories: dict[str, list[dict[str, Any]]] = {}

    async def one(saga_id: str) -> None:
        async with gate:
            histories[saga_id] = await events_of(client, saga_id)

    await asyncio.gather(*(one(s) for s in ids))
    return final, histories


def report(problems: list[str], context: str) -> str:
    shown = "\n".join(problems[:40])
    more = f"\n… and {len(problems) - 40} more" if len(problems) > 40 else ""
    return f"{context}: {len(problems)} invariant violations\n{shown}{more}"


def query(url: str, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def db_now(url: str) -> datetime:
    value = query(url, "SELECT clock_timestamp()")[0][0]
    assert isinstance(value, datetime)
    return value


def quantiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p95 / max of a list of seconds, rounded, for the figures file."""
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "max": round(ordered[-1], 3),
    }


def parse_at(value: str) -> datetime:
    return datetime.fromisoformat(value)
