"""What several chaos tests share, on top of tests.support.crash: starting many sagas at
once, collecting their outcomes and histories in parallel, and reading the database."""

from __future__ import annotations

import asyncio
import re
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
    rate: float | None = None,
) -> dict[str, str]:
    """Start `count` crash-suite sagas in parallel (every `bad_every`-th one compensates,
    as in tests.support.crash.start_sagas), at most `rate` per second; id -> definition."""
    sagas: dict[str, str] = {}
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(n: int) -> None:
        definition = BAD_DEF if bad_every and n % bad_every == 1 else OK_DEF
        if rate:
            await asyncio.sleep(max(0.0, t0 + (n - offset) / rate - loop.time()))
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
        return conn.execute(statement, params).fetchall()


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


_SAGA = re.compile(r"^saga (\S+) \(")


def lost_to_the_database(
    problems: list[str], histories: dict[str, list[dict[str, Any]]], every_process: bool = True
) -> list[str]:
    """Drop what check_run reports only because a *living* process lost sagas to the
    database (a restart, a terminated connection, a session ended for idling in a
    transaction): it gives up a saga whose commit failed and may claim it again itself
    once the lease has expired, closing its own cut-off attempt as `abandoned`. Kept: an
    `abandoned` mark for an attempt that was not open, or that was closed twice. With
    `every_process` (the database itself failed) a process may also have lost a saga it
    took over, so one saga can go back and forth; otherwise that stays a violation."""
    marks = ("marked abandoned by", "wrote again after another took")[: 2 if every_process else 1]

    def properly_abandoned(saga_id: str) -> bool:
        started: set[tuple[str, str, int]] = set()
        finished: set[tuple[str, str, int]] = set()
        for e in histories.get(saga_id, []):
            k = (e["step"], e["direction"], e["attempt"])
            if e["type"] == "attempt_started":
                started.add(k)
            elif e["type"] == "attempt_finished":
                if k not in started or k in finished:
                    return False
                finished.add(k)
        return True

    kept = []
    for problem in problems:
        match = _SAGA.match(problem)
        if match and any(mark in problem for mark in marks) and properly_abandoned(match.group(1)):
            continue
        kept.append(problem)
    return kept
