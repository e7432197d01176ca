"""Retention: finished sagas older than SAGA_RETENTION_HOURS are deleted with their steps,
events, idempotency keys and resolved dead letters, in batches, one pass at a time across
processes, while sagas run; a saga with an open dead letter, a running one, a recent one
and one an executor still expects are kept. `saga-orchestrator prune [--dry-run]`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
import psycopg
import pytest

from app.core.views import Pruned
from app.engine import runner
from app.main import create_app
from app.store.db import make_engine
from app.store.retention import PRUNE_LOCK, Retention
from tests.conftest import make_settings, wait_terminal
from tests.support.engine_helpers import define, put_service, step
from tests.support.servers import Participant, serve

HOURS = 720
RETENTION = HOURS * 3600.0

# 3000 sagas finished 1000 h ago (to delete), and 370 to keep: 50 failed ones with an open
# dead letter, 200 finished an hour ago, 100 running since long ago, 20 finished long ago
# that an executor is due to look at again. Each has 3 steps and 4 events; every even one
# an idempotency key; every tenth a resolved dead letter. 30 keys of old sagas were taken
# over by a recent saga (an expired key reused): they are kept.
SEED = """
INSERT INTO definitions (name, version, content_hash, spec)
VALUES ('old', 1, 'h', '{"name": "old", "steps": []}');
CREATE TEMP TABLE seed AS
SELECT gen_random_uuid() AS id, n,
       CASE WHEN n <= 3000 THEN 'old' WHEN n <= 3050 THEN 'open' WHEN n <= 3250 THEN 'recent'
            WHEN n <= 3350 THEN 'running' ELSE 'due' END AS kind
  FROM generate_series(1, 3370) AS n;
INSERT INTO sagas (id, definition_id, definition_name, definition_version, status, input,
                   idempotency_key, created_at, finished_at, due_at)
SELECT id, 1, 'old', 1,
       CASE kind WHEN 'running' THEN 'running' WHEN 'open' THEN 'failed'
            ELSE (ARRAY['completed', 'compensated', 'failed'])[n % 3 + 1] END,
       '{}', 'key-' || n, now() - interval '2000 hours',
       CASE kind WHEN 'running' THEN NULL WHEN 'recent' THEN now() - interval '1 hour'
            ELSE now() - interval '1000 hours' END,
       CASE kind WHEN 'due' THEN now() + interval '1 hour' END
  FROM seed;
INSERT INTO saga_steps (saga_id, idx, name, status)
SELECT id, i, 's' || i, 'succeeded' FROM seed, generate_series(0, 2) AS i;
INSERT INTO saga_events (saga_id, type) SELECT id, 'saga_started' FROM seed, generate_series(1, 4);
INSERT INTO idempotency_keys (key, fingerprint, saga_id, expires_at)
SELECT 'key-' || n, 'f', id, now() + interval '1 hour' FROM seed WHERE n % 2 = 0;
INSERT INTO idempotency_keys (key, fingerprint, saga_id, expires_at)
SELECT 'key-' || n, 'f', (SELECT id FROM seed WHERE n = 3100), now() + interval '1 hour'
  FROM seed WHERE n % 100 = 1 AND kind = 'old';
INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                          attempts, status, resolved_at, resolved_by)
SELECT gen_random_uuid(), id, 'old', 0, 's0', 'action', 1, 'discarded', now(), 'op'
  FROM seed WHERE n % 10 = 0;
INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                          attempts, status)
SELECT gen_random_uuid(), id, 'old', 1, 's1', 'compensation', 3, 'open'
  FROM seed WHERE kind = 'open';
ANALYZE;
"""
EXPECTED = Pruned(
    sagas=3000, saga_steps=9000, saga_events=12000, idempotency_keys=1500, dead_letters=300
)
TABLES = ("sagas", "saga_steps", "saga_events", "idempotency_keys", "dead_letters")


def _seed(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SEED)


def _rows(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        counts = {}
        for table in TABLES:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert row is not None
            counts[table] = row[0]
        return counts


def _kept_by_kind(db_url: str) -> dict[str, int]:
    """Which seeded sagas are still there, by kind (the temp table is gone: by key)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            """
            SELECT CASE WHEN n <= 3000 THEN 'old' WHEN n <= 3050 THEN 'open'
                        WHEN n <= 3250 THEN 'recent' WHEN n <= 3350 THEN 'running'
                        ELSE 'due' END AS kind, count(*)
              FROM (SELECT substr(idempotency_key, 5)::int AS n FROM sagas
                     WHERE definition_name = 'old') AS s
             GROUP BY 1
            """
        ).fetchall()
    return dict(rows)  # type: ignore[arg-type]


KEPT = {"open": 50, "recent": 200, "running": 100, "due": 20}


async def test_prune_deletes_exactly_what_retention_says_while_sagas_run(
    db_url: str, participant: Participant
) -> None:
    _seed(db_url)
    before = _rows(db_url)
    engine = make_engine(db_url)
    app = create_app(make_settings(), db_url, run_executor=True)
    try:
        retention = Retention(engine, batch=250, pause_seconds=0.01)
        assert await retention.dry_run(RETENTION) == EXPECTED
        assert _rows(db_url) == before  # a dry run deletes nothing
        async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
            await put_service(client, participant.url)
            await define(client, "live", [step("a"), step("b")])

            async def one(i: int) -> dict[str, Any]:
                r = await client.post("/v1/sagas", json={"definition": "live", "input": {}})
                assert r.status_code == 201, r.text
                return await wait_terminal(client, r.json()["id"])

            live = asyncio.gather(*(one(i) for i in range(30)))
            pruned = await retention.prune(RETENTION)
            finished = await live
        assert pruned == EXPECTED
        assert {s["status"] for s in finished} == {"completed"}
        after = _rows(db_url)
        live_rows = {"sagas": 30, "saga_steps": 60}
        for table in TABLES:
            deleted = before[table] - EXPECTED.counts()[table]
            if table in live_rows:
                assert after[table] == deleted + live_rows[table], table
            elif table != "saga_events":  # the live sagas' events vary in number
                assert after[table] == deleted, table
        assert _kept_by_kind(db_url) == KEPT
        with psycopg.connect(db_url) as conn:  # the taken-over keys are kept
            row = conn.execute(
                "SELECT count(*) FROM idempotency_keys WHERE key = ANY(%s)",
                ([f"key-{n}" for n in range(1, 3000, 100)],),
            ).fetchone()
            assert row is not None and row[0] == 30
            open_letters = conn.execute(
                "SELECT count(*) FROM dead_letters WHERE status = 'open'"
            ).fetchone()
            assert open_letters is not None and open_letters[0] == 50
        # Nothing more to do: a second pass and its dry run find nothing.
        assert await retention.dry_run(RETENTION) == Pruned()
        assert await retention.prune(RETENTION) == Pruned()
    finally:
        await engine.dispose()


async def test_one_pass_at_a_time_across_processes(db_url: str) -> None:
    _seed(db_url)
    first, second = make_engine(db_url), make_engine(db_url)
    try:
        # Another process holds the lock: nothing is done.
        with psycopg.connect(db_url, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (PRUNE_LOCK,))
            assert await Retention(first).prune(RETENTION) is None
            assert _rows(db_url)["sagas"] == 3370
            holder.execute("SELECT pg_advisory_unlock(%s)", (PRUNE_LOCK,))
        # Two at once: one does all the work, the other nothing.
        results = await asyncio.gather(
            Retention(first, batch=100, pause_seconds=0.02).prune(RETENTION),
            Retention(second, batch=100, pause_seconds=0.02).prune(RETENTION),
        )
        assert sorted(results, key=lambda r: r is None) == [EXPECTED, None], results
        # The lock was given back.
        assert await Retention(second).prune(RETENTION) == Pruned()
    finally:
        await first.dispose()
        await second.dispose()


def _cli(db_url: str, *args: str, hours: str = str(HOURS)) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "SAGA_RETENTION_HOURS": hours}
    return subprocess.run(
        [sys.executable, "-m", "app", "prune", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _printed(output: str) -> dict[str, int]:
    lines = [line.strip() for line in output.splitlines() if line.startswith("  ")]
    return {name: int(n) for name, n in (line.split(": ") for line in lines)}


def test_the_prune_command_and_its_dry_run(db_url: str) -> None:
    _seed(db_url)
    dry = _cli(db_url, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("would delete"), dry.stdout
    assert _printed(dry.stdout) == EXPECTED.counts()
    assert _rows(db_url)["sagas"] == 3370

    off = _cli(db_url, hours="0")
    assert off.returncode == 0 and "retention is off" in off.stdout, off
    assert _rows(db_url)["sagas"] == 3370

    real = _cli(db_url)
    assert real.returncode == 0, real.stderr
    assert real.stdout.startswith("deleted"), real.stdout
    assert _printed(real.stdout) == EXPECTED.counts()
    assert _rows(db_url)["sagas"] == 3370 - 3000
    assert _printed(_cli(db_url, "--dry-run").stdout) == Pruned().counts()


async def test_workers_prune_periodically_and_count_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(db_url)
    monkeypatch.setattr(runner, "PRUNE_EVERY_SECONDS", 0.2)
    app = create_app(make_settings(), db_url, run_executor=True)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
        for _ in range(100):
            if _rows(db_url)["sagas"] == 370:
                break
            await asyncio.sleep(0.1)
        assert _kept_by_kind(db_url) == KEPT
        # The pass counts its rows once it is over, a moment after its last delete.
        wanted = [
            f'saga_pruned_rows_total{{table="{table}"}} {float(rows)}'
            for table, rows in EXPECTED.counts().items()
        ]
        for _ in range(100):
            metrics = (await client.get("/metrics")).text
            if all(line in metrics for line in wanted):
                break
            await asyncio.sleep(0.1)
    for line in wanted:
        assert line in metrics, metrics


async def test_workers_keep_everything_when_retention_is_off(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(db_url)
    monkeypatch.setattr(runner, "PRUNE_EVERY_SECONDS", 0.1)
    app = create_app(make_settings(SAGA_RETENTION_HOURS=0), db_url, run_executor=True)
    async with serve(app):
        await asyncio.sleep(1.0)
    assert _rows(db_url)["sagas"] == 3370


def test_the_retention_setting() -> None:
    assert make_settings().retention_seconds == 720 * 3600
    assert make_settings(SAGA_RETENTION_HOURS=1.5).retention_seconds == 5400
    assert make_settings(SAGA_RETENTION_HOURS=0).retention_seconds is None
    assert make_settings(SAGA_RETENTION_HOURS="").retention_seconds is None
    with pytest.raises(ValueError):
        make_settings(SAGA_RETENTION_HOURS=-1)
