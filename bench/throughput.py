"""Saga throughput, as ratios against baselines measured in the same run.

    .venv/bin/python bench/throughput.py [--sagas 300] [--steps 3]

Shared, noisy machines make absolute times meaningless, so each figure is a ratio:

- `per_step_vs_two_commits`: orchestrated time per step, divided by the time of the
  floor the design aims at, measured here: two short commits (attempt started, outcome)
  plus one HTTP call to the same participant, done sequentially in a plain loop.
- `concurrent_speedup`: sagas/s with the executor's concurrency, divided by sagas/s
  with concurrency 1.

It creates (and drops first) a database named saga_bench on the server of
DATABASE_URL (default: the local server). BENCH_URL_STEPS=1 makes the steps absolute
URLs, which skips the per-service breaker and bulkhead gate, to measure what it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.engine.executor import Executor
from app.main import create_app
from app.settings import Settings
from app.store.db import make_engine
from app.store.migrate import upgrade
from tests.support.servers import serve

ADMIN = "bench-admin"


async def _noop(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"id": uuid.uuid4().hex})


def _fresh_database(server_url: str) -> str:
    name = "saga_bench"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    return url


async def _baseline(url: str, participant: str, steps: int) -> float:
    """Seconds per step for the floor: two short commits and one call, sequentially."""
    rounds = 200
    async with (
        await psycopg.AsyncConnection.connect(url, autocommit=False) as conn,
        httpx.AsyncClient() as client,
    ):
        await conn.execute("CREATE TEMP TABLE t (id bigint primary key, v int)")
        await conn.commit()
        started = time.perf_counter()
        for i in range(rounds * steps):
            await conn.execute("INSERT INTO t VALUES (%s, 0)", (i,))
            await conn.commit()
            await client.post(participant + "/x", json={"i": i})
            await conn.execute("UPDATE t SET v = 1 WHERE id = %s", (i,))
            await conn.commit()
        return (time.perf_counter() - started) / (rounds * steps)


async def _run(url: str, participant: str, sagas: int, steps: int, concurrency: int) -> float:
    """Seconds to run `sagas` sagas of `steps` steps with one executor."""
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        SAGA_ADMIN_TOKEN=ADMIN,
        SAGA_LOG_LEVEL="WARNING",
        SAGA_WORKER_CONCURRENCY=concurrency,
        SAGA_POLL_INTERVAL=0.05,
    )
    app = create_app(settings, url, run_executor=False)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=60) as api:
        await api.put("/v1/services/bench", json={"base_url": participant})
        name = f"bench{uuid.uuid4().hex[:8]}"
        definition = {
            "name": name,
            "steps": [
                {"name": f"s{i}", "action": {"url": participant + f"/s{i}"}}
                if os.environ.get("BENCH_URL_STEPS")
                else {"name": f"s{i}", "action": {"service": "bench", "path": f"/s{i}"}}
                for i in range(steps)
            ],
        }
        assert (await api.post("/v1/definitions", json=definition)).status_code == 201
        ids = []
        for _ in range(sagas):  # created before the executor starts: we time execution only
            r = await api.post("/v1/sagas", json={"definition": name, "input": {}})
            ids.append(r.json()["id"])
        engine = make_engine(url, 20)
        stop = asyncio.Event()
        executor = Executor(engine, settings, url)
        started = time.perf_counter()
        task = asyncio.create_task(executor.run(stop))
        while True:
            r = await api.get(
                "/v1/sagas", params={"status": "completed", "definition": name, "limit": 500}
            )
            done = len(r.json()["items"])
            if done >= min(sagas, 500) and await _all_done(url, name, sagas):
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        await engine.dispose()
        return elapsed


async def _all_done(url: str, name: str, sagas: int) -> bool:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM sagas WHERE definition_name = %s AND status = 'completed'",
            (name,),
        )
        row = await cur.fetchone()
        return row is not None and int(row[0]) >= sagas


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sagas", type=int, default=300)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    server = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = _fresh_database(server)
    participant_app = Starlette(routes=[Route("/{p:path}", _noop, methods=["POST"])])
    async with serve(participant_app) as participant:
        floor = await _baseline(url, participant, args.steps)
        serial = await _run(url, participant, max(args.sagas // 5, 20), args.steps, 1)
        serial_rate = max(args.sagas // 5, 20) / serial
        parallel = await _run(url, participant, args.sagas, args.steps, args.concurrency)
        parallel_rate = args.sagas / parallel
    per_step = serial / (max(args.sagas // 5, 20) * args.steps)
    figures: dict[str, Any] = {
        "sagas": args.sagas,
        "steps": args.steps,
        "per_step_vs_two_commits": round(per_step / floor, 2),
        "concurrent_speedup": round(parallel_rate / serial_rate, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
