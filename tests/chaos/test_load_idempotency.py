"""Idempotency under load, against two API processes sharing one database.

- 200 starts with one Idempotency-Key, all released at once: one saga, one 201, every
  other answer a 200 replay of that saga, no 5xx;
- the same with two different inputs under one key: one saga, the requests that match it
  are 201/200, the others 422 (the key is bound to the first input), no 5xx;
- 1,000 distinct keys in parallel (quick: 300): 1,000 sagas, one per key, no 5xx.

No executor runs: the sagas only need to exist. All traffic is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import Record, Scale
from tests.chaos.helpers import quantiles, query
from tests.support.crash import ADMIN_TOKEN, Launcher, Proc

pytestmark = pytest.mark.slow

DEFINITION = {
    "name": "load",
    "steps": [
        {
            "name": "only",
            # Never called: no executor runs in this test.
            "action": {"url": "http://127.0.0.1:9/never", "body": "${input}"},
        }
    ],
}


@dataclass
class Answer:
    status: int | None
    saga_id: str | None
    replayed: bool
    seconds: float
    error: str | None = None


def _client(proc: Proc, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proc.url,
        timeout=60,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def _start(
    client: httpx.AsyncClient, key: str, payload: dict[str, Any], go: asyncio.Event | None = None
) -> Answer:
    if go is not None:
        await go.wait()
    started = time.monotonic()
    try:
        r = await client.post("/v1/sagas", json=payload, headers={"Idempotency-Key": key})
    except httpx.HTTPError as exc:
        return Answer(None, None, False, time.monotonic() - started, repr(exc))
    body = r.json() if r.headers.get("content-type", "").endswith("json") else {}
    return Answer(
        r.status_code,
        body.get("id") if r.status_code in (200, 201) else None,
        r.headers.get("idempotent-replayed") == "true",
        time.monotonic() - started,
        None if r.status_code < 500 else r.text[:300],
    )


async def _burst(
    clients: list[httpx.AsyncClient], key: str, payloads: list[dict[str, Any]]
) -> list[Answer]:
    """Every request connected and waiting, then all released at once."""
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(_start(clients[i % len(clients)], key, payload, go))
        for i, payload in enumerate(payloads)
    ]
    await asyncio.sleep(0.2)
    go.set()
    return await asyncio.gather(*tasks)


@pytest.fixture
async def apis(db_url: str, launch: Callable[[str], Launcher]) -> list[Proc]:
    launcher = launch(db_url)
    procs = list(
        await asyncio.gather(
            launcher.start_ready("api", "api0"), launcher.start_ready("api", "api1")
        )
    )
    async with _client(procs[0], 4) as client:
        r = await client.post("/v1/definitions", json=DEFINITION)
        assert r.status_code in (200, 201), r.text
    return procs


async def test_one_key_many_concurrent_starts(
    db_url: str, apis: list[Proc], chaos_scale: Scale, figures: Record
) -> None:
    n = chaos_scale.same_key_requests
    clients = [_client(p, n) for p in apis]
    try:
        # Warm the connections, so that the burst is one of requests, not of handshakes.
        await asyncio.gather(*(c.get("/healthz") for c in clients for _ in range(n // 2)))
        began = time.monotonic()
        same = await _burst(clients, "one-key", [{"definition": "load", "input": {"x": 1}}] * n)
        same_seconds = time.monotonic() - began
        # Two inputs under one key: the first to commit binds the key.
        mixed = await _burst(
            clients,
            "one-key-two-inputs",
            [{"definition": "load", "input": {"x": i % 2}} for i in range(n)],
        )
    finally:
        for c in clients:
            await c.aclose()

    statuses = Counter(a.status for a in same)
    ids = {a.saga_id for a in same if a.saga_id}
    in_db = query(db_url, "SELECT count(*) FROM sagas WHERE idempotency_key = 'one-key'")[0][0]
    five_xx = [a for a in same + mixed if a.status is None or a.status >= 500]
    mixed_statuses = Counter(a.status for a in mixed)
    mixed_rows = query(
        db_url, "SELECT id, input FROM sagas WHERE idempotency_key = 'one-key-two-inputs'"
    )
    figures(
        requests=n,
        api_processes=len(apis),
        statuses={str(k): v for k, v in sorted(statuses.items(), key=str)},
        replayed=sum(a.replayed for a in same),
        sagas_created=in_db,
        distinct_ids_answered=len(ids),
        answered_5xx=len(five_xx),
        latency_seconds=quantiles([a.seconds for a in same]),
        burst_seconds=round(same_seconds, 2),
        two_inputs_statuses={str(k): v for k, v in sorted(mixed_statuses.items(), key=str)},
        two_inputs_sagas_created=len(mixed_rows),
    )

    assert not five_xx, [(a.status, a.error) for a in five_xx[:10]]
    assert in_db == 1, f"{in_db} sagas for one key"
    assert statuses == {201: 1, 200: n - 1}, statuses
    assert len(ids) == 1, ids
    replays = [a for a in same if a.status == 200]
    assert all(a.replayed for a in replays), "a 200 without Idempotent-Replayed: true"

    assert len(mixed_rows) == 1, mixed_rows
    winner = mixed_rows[0][1]["x"]
    for i, a in enumerate(mixed):
        want = (200, 201) if i % 2 == winner else (422,)
        assert a.status in want, f"request {i} with x={i % 2} answered {a.status}; x={winner} won"
        if a.status in (200, 201):
            assert a.saga_id == str(mixed_rows[0][0])
    assert mixed_statuses[201] == 1, mixed_statuses


async def test_distinct_keys_in_parallel(
    db_url: str, apis: list[Proc], chaos_scale: Scale, figures: Record
) -> None:
    n = chaos_scale.distinct_keys
    in_flight = 200
    clients = [_client(p, in_flight) for p in apis]
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> Answer:
        async with gate:
            return await _start(
                clients[i % 2], f"distinct-{i}", {"definition": "load", "input": {"i": i}}
            )

    try:
        began = time.monotonic()
        answers = await asyncio.gather(*(one(i) for i in range(n)))
        seconds = time.monotonic() - began
    finally:
        for c in clients:
            await c.aclose()

    statuses = Counter(a.status for a in answers)
    ids = [a.saga_id for a in answers if a.saga_id]
    rows = query(db_url, "SELECT idempotency_key, count(*) FROM sagas GROUP BY 1")
    per_key = dict(rows)
    five_xx = [a for a in answers if a.status is None or a.status >= 500]
    figures(
        requests=n,
        api_processes=len(apis),
        concurrency=in_flight,
        statuses={str(k): v for k, v in sorted(statuses.items(), key=str)},
        sagas_created=sum(per_key.values()),
        distinct_ids=len(set(ids)),
        answered_5xx=len(five_xx),
        latency_seconds=quantiles([a.seconds for a in answers]),
        throughput_per_second=round(n / seconds, 1),
        seconds=round(seconds, 2),
    )
    assert not five_xx, [(a.status, a.error) for a in five_xx[:10]]
    assert statuses == {201: n}, statuses
    assert len(set(ids)) == n
    assert sum(per_key.values()) == n and all(v == 1 for v in per_key.values())
    assert set(per_key) == {f"distinct-{i}" for i in range(n)}
