"""Schemathesis against the OpenAPI document the running service serves.

The real app (API + executor) runs on a fresh database with a participant service, a
`checkout` definition (the one the document's examples use), a saga, a dead letter and
an audit entry, so positive cases reach real data; schemathesis loads /openapi.json from
the server and runs every phase (examples, coverage, fuzzing, stateful via the document's
links) with every check, positive and negative data, as the admin. The verdict: no server
error and no answer that breaks the document.

What the document cannot say is configured here, each with its reason:
- `cursor` is opaque: a schema-valid string that is not a `next_cursor` is a 400;
- registration and start have rules beyond one field's schema (SAGA_ALLOWED_HOSTS, known
  services and definitions, template references, one pivot, a reused Idempotency-Key):
  a schema-valid body may get a 422 there;
- the database cannot store NUL characters: no NUL is generated (tests/integration/
  test_bad_input.py checks that one is refused with a 422);
- `POST /v1/sagas?fail_fast=true` answers 503 (declared, with Retry-After) while the first
  service's circuit is open: the fuzzer can open it by giving `payments` a tiny timeout;
- a long-poll (`wait_seconds`, up to 30) takes as long as it was asked to.

The executor calls only the participant: SAGA_ALLOWED_HOSTS is its host:port. Quick mode
keeps to about a minute; SAGA_CHAOS_FULL=1 runs many more examples.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from app.api import examples
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.fuzz.conftest import Record, full_mode
from tests.support.servers import Participant, Reply, serve

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MAX_EXAMPLES = 150 if full_mode() else 15
# Seconds schemathesis may spend in all: enough for every operation to be reached in
# quick mode too, although one generated long-poll may wait 30 s of it and its coverage
# phase alone spends 60-140 s of CPU on the start's body (its patterns) on a 2-core
# machine.
MAX_TIME = 900 if full_mode() else 300
LIST_OPERATIONS = [
    "GET /v1/services",
    "GET /v1/definitions",
    "GET /v1/sagas",
    "GET /v1/sagas/{saga_id}/events",
    "GET /v1/admin/dead-letters",
    "GET /v1/admin/audit",
]
RULED_BODIES = ["PUT /v1/services/{name}", "POST /v1/definitions", "POST /v1/sagas"]
POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


CONFIG = f"""
[checks]
max_response_time = 20  # seconds; a loaded 2-core machine is slow, a hang is slower

[generation]
allow-x00 = false
database = "none"

[[operations]]
include-name = {_toml_list(LIST_OPERATIONS)}
checks.positive_data_acceptance.expected-statuses = {_toml_list([*POSITIVE, "400"])}

[[operations]]
include-name = {_toml_list(RULED_BODIES[:2])}
checks.positive_data_acceptance.expected-statuses = {_toml_list([*POSITIVE, "422"])}

[[operations]]
include-name = ["POST /v1/sagas"]
checks.positive_data_acceptance.expected-statuses = {_toml_list([*POSITIVE, "422"])}
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
include-name = ["GET /v1/sagas/{{saga_id}}"]
checks.max_response_time = 35  # the long-poll waits up to `wait_seconds` (30)
"""


async def _seed(client: httpx.AsyncClient, participant: Participant) -> dict[str, Any]:
    """Real data for positive cases: what the document's examples name, and more."""
    participant.always("/emails", Reply(400, {"error": "mailbox unavailable"}))
    r = await client.put(
        "/v1/services/payments", json={**examples.SERVICE_SPEC, "base_url": participant.url}
    )
    assert r.status_code == 201, r.text
    r = await client.post("/v1/definitions", json=examples.DEFINITION_SPEC)
    assert r.status_code == 201, r.text
    notify = {
        "name": "notify",
        "steps": [
            {
                "name": "email",
                "critical": False,
                "action": {"service": "payments", "path": "/emails", "body": "${input}"},
            }
        ],
    }
    r = await client.post("/v1/definitions", json=notify)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/sagas", json=examples.SAGA_START, headers={"Idempotency-Key": "order-1001"}
    )
    assert r.status_code == 201, r.text
    checkout = r.json()["id"]
    r = await client.post("/v1/sagas", json={"definition": "notify", "input": {"to": "a@b.c"}})
    assert r.status_code == 201, r.text
    notified = r.json()["id"]
    for saga_id in (checkout, notified):
        r = await client.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": 20})
        assert r.json()["status"] == "completed", r.text
    r = await client.get("/v1/admin/dead-letters")
    assert len(r.json()["items"]) == 1, r.text
    r = await client.post("/v1/admin/services/payments/circuit/reset")
    assert r.status_code == 200, r.text
    return {"sagas": [checkout, notified], "dead_letter": r.json()}


def _body(response: dict[str, Any]) -> Any:
    raw = response.get("content") or {}
    if isinstance(raw, dict) and "$base64" in raw:
        with contextlib.suppress(ValueError):
            return json.loads(base64.b64decode(raw["$base64"]))
    return None


def tally(report_dir: Path) -> dict[str, Any]:
    """Every request schemathesis made and every check it ran, from its NDJSON events."""
    statuses: Counter[str] = Counter()
    by_operation: Counter[str] = Counter()
    ok_operations: set[str] = set()
    failed_checks: Counter[str] = Counter()
    checks_run = 0
    server_errors: list[str] = []
    circuit_open = 0
    requests = 0
    (events,) = report_dir.glob("*.ndjson")
    for line in events.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"].get(case_id, {}).get("value", {})
            label = f"{case.get('method', '?')} {case.get('path', '?')}"
            requests += 1
            by_operation[label] += 1
            response = interaction.get("response")
            if response is None:
                statuses["no answer"] += 1
                continue
            code = int(response["status_code"])
            statuses[f"{code // 100}xx"] += 1
            if 200 <= code < 300:
                ok_operations.add(label)
            if code >= 500:
                body = _body(response)
                kind = body.get("type", "") if isinstance(body, dict) else ""
                if code == 503 and label == "POST /v1/sagas" and kind.endswith(":circuit-open"):
                    circuit_open += 1
                else:
                    server_errors.append(f"{label} -> {code} {json.dumps(body)[:300]}")
        for results in recorder.get("checks", {}).values():
            for result in results:
                checks_run += 1
                if result["status"] == "failure":
                    failed_checks[result["name"]] += 1
    return {
        "requests": requests,
        "statuses": dict(sorted(statuses.items())),
        "requests_per_operation": dict(sorted(by_operation.items())),
        "operations_answered_2xx": sorted(ok_operations),
        "checks_run": checks_run,
        "failed_checks": dict(failed_checks),
        "server_errors": server_errors,
        "circuit_open_503": circuit_open,
    }


async def test_openapi_fuzz(db_url: str, tmp_path: Path, figures: Record, fuzz_seed: int) -> None:
    started = time.monotonic()
    participant = Participant()
    async with serve(participant.app) as participant_url:
        participant.url = participant_url
        port = urlsplit(participant_url).port
        settings = make_settings(SAGA_ALLOWED_HOSTS=f"127.0.0.1:{port}")
        app = create_app(settings, db_url, run_executor=True)
        async with (
            serve(app) as base,
            httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=40) as client,
        ):
            await _seed(client, participant)
            schema = (await client.get("/openapi.json")).json()
            (tmp_path / "schemathesis.toml").write_text(CONFIG)
            report_dir = tmp_path / "report"
            output = tmp_path / "schemathesis.txt"
            command = [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(tmp_path / "schemathesis.toml"),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                "--mode",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                str(MAX_EXAMPLES),
                "--max-time",
                str(MAX_TIME),
                "--seed",
                str(fuzz_seed),
                "--workers",
                "1",  # CPython 3.11's ast.parse is not thread-safe; hypothesis calls it
                "--request-timeout",
                "40",
                "--header",
                f"Authorization: Bearer {ADMIN_TOKEN}",
                "--report",
                "json,ndjson",
                "--report-dir",
                str(report_dir),
                "--no-color",
            ]
            with output.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    *command, cwd=tmp_path, stdout=out, stderr=asyncio.subprocess.STDOUT
                )
                try:
                    rc = await asyncio.wait_for(proc.wait(), timeout=MAX_TIME + 180)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    text = output.read_text(errors="replace")
    (report,) = (json.loads(p.read_text()) for p in report_dir.glob("*.json"))
    counts = tally(report_dir)
    operations = sum(
        1 for item in schema["paths"].values() for m in item if m in ("get", "put", "post")
    )
    violations = sum(f["count"] for f in report["failures"])
    figures(
        tool=f"schemathesis {report['schemathesis_version']}",
        seed=fuzz_seed,
        max_examples=MAX_EXAMPLES,
        operations=operations,
        operations_tested=report["operations"]["tested"],
        cases=report["test_cases"]["generated"],
        requests=counts["requests"],
        statuses=counts["statuses"],
        responses_5xx=counts["statuses"].get("5xx", 0),
        server_errors_5xx=len(counts["server_errors"]),
        circuit_open_503=counts["circuit_open_503"],
        checks_run=counts["checks_run"],
        violations=violations,
        failed_checks=counts["failed_checks"],
        tool_errors=len(report["errors"]),
        stop_reason=report["stop_reason"],
        operations_answered_2xx=len(counts["operations_answered_2xx"]),
        seconds=round(time.monotonic() - started, 1),
    )
    tail = "\n".join(text.splitlines()[-120:])
    assert not counts["server_errors"], "\n".join(counts["server_errors"][:20]) + "\n" + tail
    assert violations == 0 and not counts["failed_checks"], tail
    assert not report["errors"], tail
    assert rc == 0, tail
    assert report["operations"]["tested"] == operations == 25, report["operations"]
    # Positive cases reached real data, not only 404s and 422s.
    assert {
        "POST /v1/sagas",
        "GET /v1/sagas/{saga_id}",
        "GET /v1/definitions/{name}",
        "POST /v1/definitions",
    } <= set(counts["operations_answered_2xx"]), counts["operations_answered_2xx"]
