"""Soak: mixed traffic with faults for a while; memory, connections and lag must stay flat.

    .venv/bin/python -m tests.chaos.soak --minutes 30      (what `tasks.py chaos` runs)

One `serve` and one `worker` process against a fresh database on the local server (or
DATABASE_URL's server); a participant in this process that answers 503 (with
Retry-After) to 10% of calls, 400 to 2%, answers slowly to 5%, and dedupes on the
Idempotency-Key. Sagas start at a steady rate. Every 10 s it samples each process's RSS,
the database connections, and the executor lag from /metrics. At the end it waits for
every saga to be terminal and prints the figures as one JSON line (also appended to
test-artifacts/chaos/figures.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support import pg
from tests.support.crash import Launcher, Proc, client_for
from tests.support.servers import serve

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "test-artifacts" / "chaos" / "figures.jsonl"


class FaultyParticipant:
    """Answers by chance: 503, 400, slow, or 2xx; a key answered 2xx is never re-applied."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.applied: dict[str, dict[str, Any]] = {}
        self.replays = 0
        self.calls = 0
        self.app = Starlette(routes=[Route("/{p:path}", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> JSONResponse:
        self.calls += 1
        key = request.headers.get("idempotency-key", "")
        await request.body()
        if key in self.applied:
            self.replays += 1
            return JSONResponse(self.applied[key], status_code=200)
        roll = self.random.random()
        if roll < 0.10:
            return JSONResponse({"error": "busy"}, status_code=503, headers={"Retry-After": "0"})
        if roll < 0.12 and key.endswith(":action") and ":c:" in key:
            return JSONResponse({"error": "declined"}, status_code=400)
        if roll < 0.17:
            await asyncio.sleep(0.3)
        body = {"id": uuid.uuid4().hex}
        self.applied[key] = body
        return JSONResponse(body, status_code=200)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _lag(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("saga_executor_lag_seconds "):
            return float(line.split()[1])
    return 0.0


def _connections(url: str, database: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchone()
        return int(row[0]) if row else 0


async def soak(minutes: float, rate: float, seed: int) -> dict[str, Any]:
    with pg.server_url() as server:
        template = pg.create_template(server)
        database = pg.clone(server, template)
        url = pg.with_database(server, database)
        try:
            return await _soak(server, url, database, minutes, rate, seed)
        finally:
            pg.drop(server, database)
            pg.drop(server, template)


async def _soak(
    server: str, url: str, database: str, minutes: float, rate: float, seed: int
) -> dict[str, Any]:
    participant = FaultyParticipant(seed)
    with tempfile.TemporaryDirectory(prefix="saga-soak-") as tmp:
        launcher = Launcher(url, Path(tmp))
        try:
            async with serve(participant.app) as base:
                api = await launcher.start_ready("serve", "serve", SAGA_LEASE_SECONDS=5)
                worker = await launcher.start_ready("worker", "worker", SAGA_LEASE_SECONDS=5)
                async with client_for(api) as client:
                    return await _drive(
                        client,
                        participant,
                        base,
                        [api, worker],
                        server,
                        database,
                        minutes,
                        rate,
                    )
        finally:
            launcher.close()


async def _drive(
    client: httpx.AsyncClient,
    participant: FaultyParticipant,
    base: str,
    procs: list[Proc],
    server: str,
    database: str,
    minutes: float,
    rate: float,
) -> dict[str, Any]:
    await client.put("/v1/services/soak", json={"base_url": base, "timeout_seconds": 1})
    retry = {"max_attempts": 4, "initial_interval_seconds": 0.05, "max_interval_seconds": 0.5}
    steps = [
        {
            "name": name,
            "action": {"service": "soak", "path": f"/{name}"},
            "compensation": {"service": "soak", "path": f"/{name}/undo"},
            "retry": retry,
            "compensation_retry": {**retry, "max_attempts": 20},
        }
        for name in ("a", "b", "c")
    ]
    r = await client.post("/v1/definitions", json={"name": "soak", "steps": steps})
    assert r.status_code in (200, 201), r.text
    started = time.monotonic()
    end = started + minutes * 60
    samples: list[dict[str, Any]] = []
    ids: list[str] = []
    server_errors = 0
    next_sample = started
    while time.monotonic() < end:
        r = await client.post(
            "/v1/sagas",
            json={"definition": "soak", "input": {"n": len(ids)}},
            headers={"Idempotency-Key": f"soak-{len(ids)}"},
        )
        if r.status_code >= 500:
            server_errors += 1
        else:
            ids.append(r.json()["id"])
        if time.monotonic() >= next_sample:
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_kib": [_rss_kib(p.pid) for p in procs],
                    "connections": _connections(server, database),
                    "lag_s": await _lag(client),
                }
            )
            next_sample += 10
        await asyncio.sleep(1 / rate)
    # Drain: every saga must end.
    statuses: dict[str, int] = {}
    for saga_id in ids:
        r = await client.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": 30})
        status = r.json()["status"]
        statuses[status] = statuses.get(status, 0) + 1
    lost = sum(n for s, n in statuses.items() if s not in ("completed", "compensated", "failed"))
    first, last = samples[0], samples[-1]
    return {
        "test": "soak",
        "minutes": minutes,
        "sagas": len(ids),
        "statuses": statuses,
        "lost": lost,
        "server_errors": server_errors,
        "participant_calls": participant.calls,
        "replays_deduped": participant.replays,
        "rss_kib_start": first["rss_kib"],
        "rss_kib_end": last["rss_kib"],
        "connections_start": first["connections"],
        "connections_end": last["connections"],
        "connections_max": max(s["connections"] for s in samples),
        "lag_s_max": max(s["lag_s"] for s in samples),
        "samples": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=10.0, help="sagas started per second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    figures = asyncio.run(soak(args.minutes, args.rate, args.seed))
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps(figures) + "\n")
    print(json.dumps(figures))
    ok = figures["lost"] == 0 and figures["server_errors"] == 0
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
