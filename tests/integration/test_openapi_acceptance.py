"""Every request the document calls valid is accepted, or refused by a rule it names.

Schemathesis generates schema-valid requests only (positive mode: the examples and
random ones, plus the coverage phase's edge cases with SAGA_CHAOS_FULL=1) from the
document the running service serves, and checks each answer with
`positive_data_acceptance` and, from tests/integration/openapi_rules.py,
`documented_refusals_only`: a 400 or 422 to such a request must be a business rule
listed among the named examples of that answer (`bad-cursor`, `unknown-definition`,
`idempotency-key-reused`, `host-not-allowed`, `invalid-definition`, the retry-interval
rule), never any other invalid field (a rule the schema should have stated).
The wider fuzzing with negative data and every check is tests/fuzz/test_openapi_fuzz.py.

The API runs without an executor, so no participant is ever called.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from app.api import examples
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.fuzz.conftest import full_mode
from tests.support.servers import serve

ROOT = Path(__file__).resolve().parents[2]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The coverage phase (every boundary of every schema: about 500 cases, a minute or more
# on two cores) runs with SAGA_CHAOS_FULL=1 (`tasks.py chaos`); the usual run takes the
# examples and random cases.
FULL = full_mode()
MAX_EXAMPLES = 50 if FULL else 10
PHASES = "examples,coverage,fuzzing" if FULL else "examples,fuzzing"
LISTS = [
    "GET /v1/services",
    "GET /v1/definitions",
    "GET /v1/sagas",
    "GET /v1/sagas/{saga_id}/events",
    "GET /v1/admin/dead-letters",
    "GET /v1/admin/audit",
]
RULED_BODIES = ["PUT /v1/services/{name}", "POST /v1/definitions", "POST /v1/sagas"]
DEFAULT = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


# The statuses a rule may answer are let through positive_data_acceptance here;
# documented_refusals_only then holds each such answer to a rule the document names.
CONFIG = f"""
[generation]
allow-x00 = false
database = "none"

[[operations]]
include-name = {_toml_list(LISTS)}
checks.positive_data_acceptance.expected-statuses = {_toml_list([*DEFAULT, "400"])}

[[operations]]
include-name = {_toml_list(RULED_BODIES)}
checks.positive_data_acceptance.expected-statuses = {_toml_list([*DEFAULT, "422"])}
"""


async def _seed(client: httpx.AsyncClient) -> None:
    """What the document's examples name: the `payments` service, the `checkout`
    definition and a saga started with Idempotency-Key `order-1001`."""
    r = await client.put("/v1/services/payments", json=examples.SERVICE_SPEC)
    assert r.status_code == 201, r.text
    r = await client.post("/v1/definitions", json=examples.DEFINITION_SPEC)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/sagas", json=examples.SAGA_START, headers={"Idempotency-Key": "order-1001"}
    )
    assert r.status_code == 201, r.text


@pytest.mark.slow
async def test_schema_valid_requests_are_accepted(db_url: str, tmp_path: Path) -> None:
    # No executor: sagas stay where they are put. 127.0.0.1 is allowed (any port), so
    # the examples register; other hosts are a documented `host-not-allowed`.
    settings = make_settings(SAGA_ALLOWED_HOSTS="127.0.0.1")
    app = create_app(settings, db_url, run_executor=False)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, headers=ADMIN) as client:
        await _seed(client)
        (tmp_path / "schemathesis.toml").write_text(CONFIG)
        report_dir = tmp_path / "report"
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(tmp_path / "schemathesis.toml"),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "positive_data_acceptance,documented_refusals_only,not_a_server_error",
            "--mode",
            "positive",
            "--phases",
            PHASES,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "16",
            "--workers",
            "1",
            "--request-timeout",
            "35",  # a long-poll of a saga that never ends (no executor) holds up to 30 s
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
            "--report",
            "json",
            "--report-dir",
            str(report_dir),
            "--no-color",
        ]
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.integration.openapi_rules",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        output = tmp_path / "schemathesis.txt"
        with output.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=tmp_path, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
            )
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout=240)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    text = output.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-150:])
    (report,) = (json.loads(p.read_text()) for p in report_dir.glob("*.json"))
    assert not report["failures"], tail
    assert not report["errors"], tail
    assert rc == 0, tail
    assert report["operations"]["tested"] == 25, report["operations"]
