"""Secret values (service headers, tokens) never appear in an answer, a log line, an
event, a dead letter or a metric, also not when a database or network error is being
reported (contract §2).

A real `serve` process with JSON logs; a service whose header is the secret; a
participant that echoes it back in error bodies; then database errors forced on the
registration path and on the executor's path with triggers. Everything a person or a
client could read is then searched for the secret.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from starlette.requests import Request
from starlette.responses import Response

from tests.support.crash import ADMIN_TOKEN, Launcher, Proc
from tests.support.servers import Participant, serve

pytestmark = pytest.mark.slow

SECRET = "TOPSECRET-5f3a9c1e7b"
API_TOKEN = "api-token-for-secret-tests-0123"
METRICS_TOKEN = "metrics-token-for-secret-tests-01"


class Echoing(Participant):
    """Answers every call with an error whose body repeats the request's headers."""

    async def _handle(self, request: Request) -> Response:
        await request.body()
        headers = dict(request.headers)
        status = 401 if request.url.path.endswith("/auth") else 503
        return Response(
            json.dumps({"error": "rejected", "you_sent": headers}),
            status_code=status,
            media_type="application/json",
        )


@pytest.fixture
async def world(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Proc, Participant, str]]:
    participant = Echoing()
    async with serve(participant.app) as base:
        launcher = Launcher(db_url, tmp_path)
        try:
            proc = await launcher.start_ready(
                "serve",
                "orchestrator",
                SAGA_LOG_FORMAT="json",
                SAGA_API_TOKEN=API_TOKEN,
                SAGA_METRICS_TOKEN=METRICS_TOKEN,
            )
            yield proc, participant, base
        finally:
            launcher.close()


def _client(proc: Proc, token: str = ADMIN_TOKEN) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proc.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    )


async def _terminal(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    for _ in range(60):
        r = await client.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": 5})
        if r.json()["status"] in ("completed", "compensated", "failed"):
            return r.json()
    raise AssertionError(f"saga {saga_id} did not end")


async def test_secrets_never_leak_after_participant_and_database_errors(
    world: tuple[Proc, Participant, str], db_url: str
) -> None:
    proc, _participant, base = world
    fast = {"max_attempts": 2, "initial_interval_seconds": 0.05, "jitter": False}
    answers: list[str] = []
    async with _client(proc) as admin:
        r = await admin.put(
            "/v1/services/keyed",
            json={"base_url": base, "headers": {"X-Api-Key": SECRET}, "timeout_seconds": 2},
        )
        assert r.status_code == 201, r.text
        answers.append(r.text)
        definition = {
            "name": "leaky",
            "steps": [
                {
                    "name": "charge",
                    "critical": False,  # a dead letter holds the request that was sent
                    "action": {"service": "keyed", "path": "/charge/auth"},
                    "retry": fast,
                },
                {
                    "name": "order",
                    "action": {"service": "keyed", "path": "/order"},
                    "compensation": {"service": "keyed", "path": "/order/undo"},
                    "retry": fast,
                    "compensation_retry": fast,
                },
            ],
        }
        r = await admin.post("/v1/definitions", json=definition)
        assert r.status_code == 201, r.text
        async with _client(proc, API_TOKEN) as api:
            r = await api.post("/v1/sagas", json={"definition": "leaky", "input": {}})
            assert r.status_code == 201, r.text
            saga = await _terminal(api, r.json()["id"])
            answers.append(json.dumps(saga))
            for path in (f"/v1/sagas/{saga['id']}/events", "/v1/services", "/v1/services/keyed"):
                answers.append((await api.get(path)).text)

        # Database errors with the secret among the statement's parameters: the
        # registration path (a trigger refuses the update) ...
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                """
                CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                $$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$;
                CREATE TRIGGER refuse_services BEFORE UPDATE ON services
                  FOR EACH ROW EXECUTE FUNCTION refuse();
                """
            )
        r = await admin.put(
            "/v1/services/keyed",
            json={"base_url": base, "headers": {"X-Api-Key": SECRET, "X-More": SECRET + "2"}},
        )
        assert r.status_code == 500, r.text
        answers.append(r.text)
        # ... and the executor's (its commit of a step's outcome fails).
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_steps BEFORE UPDATE ON saga_steps FOR EACH ROW "
                "WHEN (NEW.last_error IS NOT NULL) EXECUTE FUNCTION refuse()"
            )
        r = await admin.post("/v1/sagas", json={"definition": "leaky", "input": {}})
        assert r.status_code == 201, r.text
        await asyncio.sleep(4)  # a few executor errors on it
        for path in ("/v1/admin/dead-letters", "/v1/admin/audit", "/v1/admin/dashboard"):
            answers.append((await admin.get(path)).text)
        answers.append((await admin.get("/metrics")).text)
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as anyone:
        metrics = await anyone.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert metrics.status_code == 200
        answers.append(metrics.text)

    # The process's own output (the launcher's first line records the test's env).
    lines = proc.log.read_text(errors="replace").splitlines()
    log = "\n".join(line for line in lines if not line.startswith("$ "))
    assert "database error" in log and "saga task failed" in log, "the faults did not happen"
    with psycopg.connect(db_url) as conn:
        stored = [
            json.dumps(row, default=str)
            for table in ("saga_events", "saga_steps", "sagas", "dead_letters", "admin_audit")
            for row in conn.execute(f"SELECT * FROM {table}").fetchall()
        ]
    places = {"log": log, "answers": "\n".join(answers), "tables": "\n".join(stored)}
    for where, text in places.items():
        assert SECRET not in text, f"the secret appears in the {where}"
        for token in (ADMIN_TOKEN, API_TOKEN, METRICS_TOKEN):
            assert token not in text, f"a token appears in the {where}"
    # The echoed error bodies were kept, masked.
    assert "[redacted]" in places["tables"]
