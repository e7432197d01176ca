"""`saga-orchestrator plan FILE.json [--services FILE.json] [--strict] [--json]`: the plan
and checklist of a definition file without a database, and its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import cli

RETRY = {"max_attempts": 4, "initial_interval_seconds": 0.2, "max_interval_seconds": 10}
DEFINITION: dict[str, Any] = {
    "name": "checkout",
    "timeout_seconds": 300,
    "steps": [
        {
            "name": "charge_payment",
            "action": {"service": "payments", "path": "/charges"},
            "compensation": {"service": "payments", "path": "/refunds"},
            "retry": RETRY,
        },
        {
            "name": "create_order",
            "action": {"service": "orders", "path": "/orders"},
            "compensation": {"service": "orders", "path": "/orders/cancel"},
            "retry": RETRY,
        },
    ],
}
SERVICES = {"payments": {"base_url": "http://pay.test"}, "orders": {"base_url": "http://ord.test"}}


def write(tmp_path: Path, name: str, doc: Any) -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(["plan", *args])
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().out


def test_prints_the_plan_and_the_checklist(tmp_path: Path, capsys: Any) -> None:
    code, out = run(capsys, write(tmp_path, "d.json", DEFINITION))
    assert code == 0
    assert "checkout: 2 steps, deadline 300 s" in out
    assert "http_5xx      4 attempts, last within 0-1.4 s: compensate -> compensated; " in out
    assert "undo create_order?, charge_payment" in out
    # Without --services the services are unknown, and the isolation rule says so.
    assert "NOT OK  isolation" in out and "--services" in out


def test_strict_fails_on_a_finding_that_is_not_ok(tmp_path: Path, capsys: Any) -> None:
    definition = write(tmp_path, "d.json", DEFINITION)
    services = write(tmp_path, "s.json", SERVICES)
    assert run(capsys, definition, "--strict")[0] == 1  # unknown services
    code, out = run(capsys, definition, "--services", services, "--strict")
    assert code == 0, out
    assert "NOT OK" not in out

    no_jitter = json.loads(json.dumps(DEFINITION))
    no_jitter["steps"][1]["retry"]["jitter"] = False
    code, out = run(capsys, write(tmp_path, "j.json", no_jitter), "--services", services)
    assert code == 0  # not strict: findings are printed, never fatal
    assert "NOT OK  retries_controlled       create_order: retry.jitter is off" in out
    assert run(capsys, str(tmp_path / "j.json"), "--services", services, "--strict")[0] == 1


def test_json_is_the_apis_document(tmp_path: Path, capsys: Any) -> None:
    services = write(tmp_path, "s.json", SERVICES)
    code, out = run(capsys, write(tmp_path, "d.json", DEFINITION), "--services", services, "--json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["definition"], doc["version"]) == ("checkout", None)
    assert all(f["ok"] for f in doc["checklist"])
    order = doc["steps"][1]["failures"]
    assert order["http_5xx"]["compensates"] == ["create_order?", "charge_payment"]
    assert order["http_5xx"]["retry_window_seconds"] == [0.0, 1.4]


def test_services_may_be_a_get_services_answer(tmp_path: Path, capsys: Any) -> None:
    page = {
        "items": [
            {
                "name": name,
                "base_url": doc["base_url"],
                "timeout_seconds": 2.0,
                "max_concurrency": 20,
                "circuit_breaker": {"failure_threshold": 5},
                "headers": {"X-Api-Key": "[redacted]"},
                "circuit_state": "closed",
                "in_flight": 0,
            }
            for name, doc in SERVICES.items()
        ],
        "next_cursor": None,
    }
    short = {**DEFINITION, "timeout_seconds": 7}  # 4 attempts of 2 s: 8 s
    code, out = run(
        capsys,
        write(tmp_path, "d.json", short),
        "--services",
        write(tmp_path, "s.json", page),
        "--strict",
    )
    assert code == 1
    assert "NOT OK  timeouts_defined" in out
    assert "NOT OK  isolation" not in out


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "cannot read the definition as JSON"),
        ({"name": "x", "steps": []}, "steps"),
        (
            {
                "name": "x",
                "steps": [{"name": "a", "action": {"url": "http://h.test/${steps.b.response.id}"}}],
            },
            "unknown or not earlier",
        ),
    ],
)
def test_a_bad_file_is_status_2_with_what_to_fix(
    tmp_path: Path, capsys: Any, content: Any, says: str
) -> None:
    code, out = run(capsys, write(tmp_path, "d.json", content))
    assert code == 2
    assert says in out
    assert "Traceback" not in out


def test_an_unknown_service_in_the_services_file_is_refused(tmp_path: Path, capsys: Any) -> None:
    services = write(tmp_path, "s.json", {"payments": SERVICES["payments"]})
    code, out = run(capsys, write(tmp_path, "d.json", DEFINITION), "--services", services)
    assert code == 2
    assert "unknown service 'orders'" in out


def test_the_console_command_needs_no_database(tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = subprocess.run(
        [sys.executable, "-m", "app", "plan", write(tmp_path, "d.json", DEFINITION), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["definition"] == "checkout"
