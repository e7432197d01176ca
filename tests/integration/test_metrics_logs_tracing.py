"""Observability: Prometheus metrics, JSON logs without secrets, W3C trace context
forwarded to participants, and the dashboard's figures as JSON."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.logs import JsonFormatter
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, make_settings, wait_terminal
from tests.support.servers import Participant, Reply, serve

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


# --- helpers ----------------------------------------------------------------------------


def fast_retry(max_attempts: int = 3) -> dict[str, Any]:
    return {
        "max_attempts": max_attempts,
        "initial_interval_seconds": 0.05,
        "backoff_coefficient": 1.0,
        "max_interval_seconds": 0.1,
        "jitter": False,
    }


def step(
    name: str, service: str = "svc", *, compensate: bool = True, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": service, "path": f"/{name}", "body": {"saga": "${saga.id}"}},
        "retry": fast_retry(),
        "compensation_retry": fast_retry(),
    }
    if compensate:
        doc["compensation"] = {"service": service, "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


async def put_service(client: httpx.AsyncClient, name: str, url: str, **extra: Any) -> None:
    r = await client.put(f"/v1/services/{name}", json={"base_url": url, **extra})
    assert r.status_code in (200, 201), r.text


async def define(client: httpx.AsyncClient, name: str, *steps: dict[str, Any]) -> None:
    r = await client.post("/v1/definitions", json={"name": name, "steps": list(steps)})
    assert r.status_code in (200, 201), r.text


async def start(
    client: httpx.AsyncClient,
    definition: str,
    headers: dict[str, str] | None = None,
    **input_: Any,
) -> str:
    r = await client.post(
        "/v1/sagas", json={"definition": definition, "input": input_}, headers=headers
    )
    assert r.status_code == 201, r.text
    saga_id: str = r.json()["id"]
    return saga_id


async def run(client: httpx.AsyncClient, definition: str, **input_: Any) -> dict[str, Any]:
    saga: dict[str, Any] = await wait_terminal(client, await start(client, definition, **input_))
    return saga


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient) -> tuple[set[str], Samples]:
    """Family and sample names, and every sample's value by (name, labels)."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        names.add(family.name)
        for s in family.samples:
            names.add(s.name)
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when it does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_for(predicate: Any, seconds: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- /metrics ---------------------------------------------------------------------------

EXPECTED_NAMES = [
    "saga_started_total",
    "saga_finished_total",
    "saga_step_attempts_total",
    "saga_step_latency_seconds_bucket",
    "saga_sagas",
    "saga_circuit_state",
    "saga_dead_letters_open",
    "saga_executor_lag_seconds",
]


async def test_metrics_names_and_values_move_as_sagas_run(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, "svc", participant.url)
    await put_service(orchestrator, "mail", participant.url)
    await put_service(
        orchestrator,
        "flaky",
        participant.url,
        circuit_breaker={"failure_threshold": 1, "recovery_timeout_seconds": 300},
    )
    await define(orchestrator, "flow", step("a"), step("b"))
    await define(orchestrator, "side", step("note", "mail", compensate=False, critical=False))
    await define(
        orchestrator,
        "fragile",
        step("shaky", "flaky", compensate=False, retry=fast_retry(max_attempts=1)),
    )

    _, before = await scrape(orchestrator)
    assert value(before, "saga_dead_letters_open") == 0
    assert value(before, "saga_circuit_state", service="svc") == 0  # closed once registered

    participant.script("/b", Reply(200), Reply(200), Reply(400, {"error": "no stock"}))
    statuses = [(await run(orchestrator, "flow", n=i))["status"] for i in range(3)]
    assert statuses == ["completed", "completed", "compensated"]
    participant.always("/note", Reply(400, {"error": "bad address"}))
    assert (await run(orchestrator, "side"))["status"] == "completed"  # non-critical
    participant.always("/shaky", Reply(503))
    assert (await run(orchestrator, "fragile"))["status"] == "compensated"

    names, after = await scrape(orchestrator)
    for name in EXPECTED_NAMES:
        assert name in names, f"{name} missing from /metrics"
    assert "saga_service_calls_in_flight" in names or "saga_executor_calls_in_flight" in names

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("saga_started_total", definition="flow") == 3
    assert delta("saga_started_total", definition="side") == 1
    assert delta("saga_finished_total", definition="flow", status="completed") == 2
    assert delta("saga_finished_total", definition="flow", status="compensated") == 1
    assert delta("saga_finished_total", definition="side", status="completed") == 1
    assert delta("saga_finished_total", definition="fragile", status="compensated") == 1

    attempts = "saga_step_attempts_total"
    # a x3 and b x2 succeeded; b once failed for good (400); a compensated once.
    assert delta(attempts, service="svc", direction="action", outcome="succeeded") == 5
    assert delta(attempts, service="svc", direction="action", outcome="failed") == 1
    assert delta(attempts, service="svc", direction="compensation", outcome="succeeded") == 1
    assert delta(attempts, service="mail", direction="action", outcome="failed") == 1
    # One attempt, failed with a 503 (labelled by its class, retryable, even as the last).
    flaky = [
        delta(attempts, service="flaky", direction="action", outcome=o)
        for o in ("succeeded", "retryable", "failed")
    ]
    assert flaky[0] == 0 and flaky[1] + flaky[2] == 1

    latency = "saga_step_latency_seconds"
    assert delta(f"{latency}_count", service="svc", direction="action") == 6
    assert delta(f"{latency}_bucket", service="svc", direction="action", le="+Inf") == 6
    assert delta(f"{latency}_count", service="svc", direction="compensation") == 1
    assert value(after, f"{latency}_sum", service="svc", direction="action") > 0

    # Finished sagas are counted by the executor; the saga_sagas gauge is in-flight only
    # (read from a partial index, whatever the size of the history).
    assert delta("saga_finished_total", definition="flow", status="completed") == 2
    assert delta("saga_finished_total", definition="flow", status="compensated") == 1
    assert delta("saga_finished_total", definition="side", status="completed") == 1
    assert value(after, "saga_sagas", definition="flow", status="completed") == 0
    assert value(after, "saga_dead_letters_open") == 1
    assert value(after, "saga_circuit_state", service="svc") == 0
    assert value(after, "saga_circuit_state", service="flaky") == 2  # opened by the 503
    assert value(after, "saga_executor_lag_seconds") >= 0
    assert value(after, "saga_executor_calls_in_flight") == 0


async def test_in_flight_calls_show_in_metrics_and_dashboard_json(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, "slow", participant.url)
    await define(orchestrator, "wait", step("hold", "slow", compensate=False))
    participant.always("/hold", Reply(200, delay=1.5))
    saga_id = await start(orchestrator, "wait")
    await wait_for(lambda: participant.in_flight == 1)

    _, during = await scrape(orchestrator)
    assert value(during, "saga_executor_calls_in_flight") == 1
    assert value(during, "saga_service_calls_in_flight", service="slow") == 1
    assert value(during, "saga_sagas", definition="wait", status="running") == 1
    board = (await orchestrator.get("/v1/admin/dashboard", headers=ADMIN)).json()
    assert board["in_flight"] == 1
    assert board["sagas_by_status"]["running"] == 1
    (slow,) = [s for s in board["services"] if s["name"] == "slow"]
    assert slow["in_flight"] == 1

    assert (await wait_terminal(orchestrator, saga_id))["status"] == "completed"
    _, after = await scrape(orchestrator)
    assert value(after, "saga_executor_calls_in_flight") == 0
    assert value(after, "saga_service_calls_in_flight", service="slow") == 0
    board = (await orchestrator.get("/v1/admin/dashboard", headers=ADMIN)).json()
    assert board["in_flight"] == 0
    assert [s["in_flight"] for s in board["services"] if s["name"] == "slow"] == [0]


# --- logs -------------------------------------------------------------------------------

SECRET = "s3cr3t-value"
API_TOKEN = "api-b34r3r-token-for-log-test"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged in this process during the test (DEBUG and up), as app.logs JSON."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def guarded(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """API + executor with SAGA_API_TOKEN set; the client sends the admin token (which
    may register services and definitions) on every call."""
    app = create_app(make_settings(SAGA_API_TOKEN=API_TOKEN), db_url, run_executor=True)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=40, headers=headers) as client,
    ):
        yield client


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


async def test_one_json_attempt_line_per_attempt_and_no_secrets_logged(
    guarded: httpx.AsyncClient, participant: Participant, json_log: io.StringIO
) -> None:
    r = await guarded.get("/v1/services")
    assert r.status_code == 200  # the bearer token is needed and works
    await put_service(guarded, "keyed", participant.url, headers={"X-Api-Key": SECRET})
    await define(guarded, "one", step("charge", "keyed", compensate=False))
    await define(guarded, "twice", step("flaky", "keyed", compensate=False))
    await define(guarded, "parked", step("mail", "keyed", compensate=False, critical=False))

    r = await guarded.post(
        "/v1/sagas",
        json={"definition": "one", "input": {"card": "4111"}},
        headers={"X-Request-ID": "log-test-request-1"},
    )
    assert r.status_code == 201, r.text
    one = await wait_terminal(guarded, r.json()["id"])
    assert one["status"] == "completed"
    participant.script("/flaky", Reply(503), Reply(200))
    twice = await run(guarded, "twice")
    assert twice["status"] == "completed"
    participant.always("/mail", Reply(400, {"error": "bad address"}))
    parked = await run(guarded, "parked")
    assert parked["status"] == "completed"
    r = await guarded.get("/v1/admin/dead-letters", headers=ADMIN, params={"status": "open"})
    assert r.status_code == 200 and len(r.json()["items"]) == 1, r.text

    # The secret was really sent to the participant ...
    assert participant.to("/charge")[0].headers["x-api-key"] == SECRET
    # ... and never written to the log, nor the bearer tokens.
    raw = json_log.getvalue()
    assert SECRET not in raw
    assert API_TOKEN not in raw
    assert ADMIN_TOKEN not in raw

    lines = log_lines(json_log)
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line), line

    def attempts_of(saga_id: str) -> list[dict[str, Any]]:
        return [x for x in lines if x["msg"] == "attempt" and x.get("saga_id") == saga_id]

    (attempt,) = attempts_of(one["id"])
    assert attempt["step"] == "charge"
    assert attempt["attempt"] == 1
    assert attempt["service"] == "keyed"
    assert attempt["outcome"] == "succeeded"
    assert isinstance(attempt["duration_ms"], int | float) and attempt["duration_ms"] >= 0
    assert attempt["level"] == "info"

    retried = attempts_of(twice["id"])
    assert [(x["step"], x["attempt"], x["outcome"]) for x in retried] == [
        ("flaky", 1, "retryable"),
        ("flaky", 2, "succeeded"),
    ]
    assert [x["outcome"] for x in attempts_of(parked["id"])] == ["failed"]

    # The request log line carries the caller's request id.
    started = [
        x
        for x in lines
        if x["msg"] == "request" and x.get("path") == "/v1/sagas" and x.get("method") == "POST"
    ]
    assert any(x.get("request_id") == "log-test-request-1" for x in started), started


# --- tracing ----------------------------------------------------------------------------


def traceparents(calls: list[Any]) -> list[tuple[str, str, str]]:
    out = []
    for call in calls:
        header = call.headers.get("traceparent")
        assert header is not None, f"{call.method} {call.path} has no traceparent"
        m = TRACEPARENT.match(header)
        assert m, f"{call.path}: malformed traceparent {header!r}"
        trace_id, span_id, flags = m.groups()
        assert trace_id != "0" * 32 and span_id != "0" * 16, header
        out.append((trace_id, span_id, flags))
    return out


async def test_participant_calls_are_child_spans_of_the_callers_trace(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, "svc", participant.url)
    await define(orchestrator, "traced", step("a"), step("b"))
    participant.script("/a", Reply(503), Reply(200))
    participant.script("/b", Reply(400))
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    saga_id = await start(
        orchestrator, "traced", headers={"traceparent": f"00-{trace_id}-{caller_span}-01"}
    )
    saga = await wait_terminal(orchestrator, saga_id)
    assert saga["status"] == "compensated"
    calls = participant.calls
    assert [c.path for c in calls] == ["/a", "/a", "/b", "/a/undo"]

    spans = traceparents(calls)
    assert {t for t, _, _ in spans} == {trace_id}
    assert all(span != caller_span for _, span, _ in spans)
    assert len({span for _, span, _ in spans}) == len(spans), "a span id was reused"
    assert {flags for _, _, flags in spans} == {"01"}  # the caller's sampling decision


async def test_calls_carry_a_valid_traceparent_without_an_incoming_one(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, "svc", participant.url)
    await define(orchestrator, "untraced", step("a"), step("b"))
    participant.script("/a", Reply(503), Reply(200))
    assert (await run(orchestrator, "untraced"))["status"] == "completed"
    # A malformed incoming traceparent is ignored, not forwarded.
    bad = "00-XYZ-not-a-trace"
    saga_id = await start(orchestrator, "untraced", headers={"traceparent": bad})
    assert (await wait_terminal(orchestrator, saga_id))["status"] == "completed"

    assert len(participant.calls) == 5
    spans = traceparents(participant.calls)
    assert len({span for _, span, _ in spans}) == len(spans)
    assert all(c.headers["traceparent"] != bad for c in participant.calls)


# --- GET /v1/admin/dashboard ------------------------------------------------------------


async def test_dashboard_json_needs_the_admin_token(orchestrator: httpx.AsyncClient) -> None:
    r = await orchestrator.get("/v1/admin/dashboard")
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    r = await orchestrator.get(
        "/v1/admin/dashboard", headers={"Authorization": "Bearer not-the-token"}
    )
    assert r.status_code in (401, 403), r.text
    r = await orchestrator.get("/v1/admin/dashboard", headers=ADMIN)
    assert r.status_code == 200, r.text


async def test_dashboard_json_figures(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, "svc", participant.url)
    await put_service(orchestrator, "mail", participant.url)
    await define(orchestrator, "flow", step("a"), step("b"))
    await define(orchestrator, "side", step("note", "mail", compensate=False, critical=False))
    participant.script("/b", Reply(200), Reply(200), Reply(400, {"error": "no stock"}))
    sagas = [await run(orchestrator, "flow", n=i) for i in range(3)]
    assert [s["status"] for s in sagas] == ["completed", "completed", "compensated"]
    participant.always("/note", Reply(400))
    assert (await run(orchestrator, "side"))["status"] == "completed"

    r = await orchestrator.get("/v1/admin/dashboard", headers=ADMIN)
    assert r.status_code == 200, r.text
    board = r.json()
    assert board["sagas_by_status"] == {
        "running": 0,
        "compensating": 0,
        "completed": 3,
        "compensated": 1,
        "failed": 0,
    }
    assert board["sagas_by_definition"] == {
        "flow": {"completed": 2, "compensated": 1},
        "side": {"completed": 1},
    }
    assert board["in_flight"] == 0
    assert board["dead_letters_open"] == 1

    hour = board["last_hour"]
    assert hour["finished"] == 4
    assert hour["failed"] == 1
    assert hour["failure_rate"] == pytest.approx(0.25)
    buckets = hour["buckets"]
    assert len(buckets) == 12
    assert all(set(b) == {"at", "finished", "failed"} for b in buckets)
    starts = [datetime.fromisoformat(b["at"]) for b in buckets]
    assert all(b - a == timedelta(minutes=5) for a, b in pairwise(starts))
    assert sum(b["finished"] for b in buckets) == 4
    assert sum(b["failed"] for b in buckets) == 1
    assert buckets[-1]["finished"] >= 1  # the latest bucket holds what just finished

    services = {s["name"]: s for s in board["services"]}
    assert set(services) == {"svc", "mail"}
    for s in services.values():
        assert s["circuit_state"] == "closed"
        assert s["in_flight"] == 0

    (failure,) = board["recent_failures"]
    assert failure["id"] == sagas[2]["id"]
    assert failure["definition"] == "flow"
    assert failure["status"] == "compensated"
    assert failure["error"]["step"] == "b"
    assert failure["error"]["kind"] == "http_status"
    assert "400" in failure["error"]["message"]
    assert datetime.fromisoformat(failure["finished_at"])
