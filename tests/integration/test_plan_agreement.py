"""The failure plan agrees with the engine: a six-step definition (compensated steps, a
fallback, a non-critical step, a pivot, a critical step after it) is run as real sagas
against a real participant over HTTP, with each step failing in each way (a 4xx, a
retried 5xx, timeouts, a refused connection, an open circuit, the deadline passing), and
for every case the attempts of the failing step, the compensations that ran (in order,
unknown outcomes marked `?`), what followed and the saga's final status and error are
what `GET /v1/definitions/{name}/plan` said before the saga started."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import ADMIN_TOKEN, wait_terminal
from tests.support.engine_helpers import events, fast_retry, get_saga, start
from tests.support.servers import Participant, Reply, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STEPS = ["reserve", "charge", "score", "note", "ship", "mail"]
BEFORE_PIVOT = STEPS[:5]
CLOSED = 1000  # a failure threshold no case reaches: the plan's other rows assume it


def flow(name: str, deadline: float, step_timeout: float) -> dict[str, Any]:
    """Each step calls its own service, at a path that carries the case (so that the
    sagas of many cases can run at once, each failing at its own step)."""

    def one(step: str, compensate: bool = True, **extra: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": step,
            "action": {"service": f"svc-{step}", "path": f"/${{input.case}}/{step}"},
            "timeout_seconds": step_timeout,
            "retry": fast_retry(3),
            "compensation_retry": fast_retry(3),
        }
        if compensate:
            doc["compensation"] = {
                "service": f"svc-{step}",
                "path": f"/${{input.case}}/{step}/undo",
            }
        return {**doc, **extra}

    return {
        "name": name,
        "timeout_seconds": deadline,
        "steps": [
            one("reserve"),
            one("charge"),
            one("score", fallback={"response": {"score": 0}}),
            one("note", compensate=False, critical=False),
            one("ship", pivot=True),
            one("mail", compensate=False),
        ],
    }


async def put_service(client: httpx.AsyncClient, step: str, url: str, **breaker: Any) -> None:
    doc = {
        "base_url": url,
        "circuit_breaker": {
            "failure_threshold": CLOSED,
            "recovery_timeout_seconds": 600,
            **breaker,
        },
    }
    r = await client.put(f"/v1/services/svc-{step}", json=doc)
    assert r.status_code in (200, 201), r.text


async def plan_of(client: httpx.AsyncClient, name: str) -> dict[str, dict[str, Any]]:
    r = await client.get(f"/v1/definitions/{name}/plan")
    assert r.status_code == 200, r.text
    return {s["name"]: s["failures"] for s in r.json()["steps"]}


async def observed(client: httpx.AsyncClient, saga: dict[str, Any], step: str) -> dict[str, Any]:
    """What the engine did, in the plan's terms."""
    history = await events(client, saga["id"])
    succeeded = {
        e["step"]
        for e in history
        if e["type"] == "attempt_finished"
        and e["direction"] == "action"
        and e["outcome"] == "succeeded"
    }
    compensated: list[str] = []
    for e in sorted(history, key=lambda e: e["id"]):
        if e["type"] == "attempt_started" and e["direction"] == "compensation":
            name = e["step"] + ("" if e["step"] in succeeded else "?")
            if name not in compensated:
                compensated.append(name)
    (state,) = [s for s in saga["steps"] if s["name"] == step]
    if state["status"] == "fallback":
        then = "fallback"
    elif saga["status"] == "failed":
        then = "dead_letter"
    elif state["status"] == "failed" and saga["error"] is None:
        then = "continue"
    else:
        then = "compensate"
    return {
        "attempts": state["attempts"],
        "then": then,
        "compensates": compensated,
        "final_status": saga["status"],
        "error_kind": saga["error"]["kind"] if saga["error"] else None,
    }


def planned(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("attempts", "then", "compensates", "final_status", "error_kind")}


async def run_cases(
    client: httpx.AsyncClient, definition: str, cases: list[tuple[str, str]], seconds: float = 60
) -> dict[tuple[str, str], dict[str, Any]]:
    """Start one saga per (step, kind) at once; their observed outcomes."""
    started = [await start(client, definition, {"case": f"{kind}-{step}"}) for step, kind in cases]
    finished = await asyncio.gather(
        *(wait_terminal(client, s["id"], seconds=seconds) for s in started)
    )
    return {
        case: await observed(client, saga, case[0])
        for case, saga in zip(cases, finished, strict=True)
    }


async def test_the_plan_says_what_the_engine_does(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    client = orchestrator
    for step in STEPS:
        await put_service(client, step, participant.url)
    for doc in (flow("flow", 60, 1.0), flow("short", 3, 4.0)):
        r = await client.post("/v1/definitions", json=doc)
        assert r.status_code == 201, r.text
    plan = await plan_of(client, "flow")
    short = await plan_of(client, "short")
    mismatches: list[str] = []

    def compare(name: str, entry: dict[str, Any], seen: dict[str, Any]) -> None:
        if planned(entry) != seen:
            mismatches.append(f"{name}: planned {planned(entry)}, observed {seen}")

    # A 4xx, a retried 5xx, a timeout: every step, all at once.
    for step in STEPS:
        participant.always(f"/http_4xx-{step}/{step}", Reply(400))
        participant.always(f"/http_5xx-{step}/{step}", Reply(503))
        participant.always(f"/timeout-{step}/{step}", Reply(delay=3.0))
    cases = [(step, kind) for kind in ("http_4xx", "http_5xx", "timeout") for step in STEPS]
    for (step, kind), seen in (await run_cases(client, "flow", cases)).items():
        compare(f"{step}/{kind}", plan[step][kind], seen)

    # A refused connection: the step's service moves to a port nobody listens on.
    dead = f"http://127.0.0.1:{free_port()}"
    for step in STEPS:
        await put_service(client, step, dead)
        seen = (await run_cases(client, "flow", [(step, "connection")]))[(step, "connection")]
        compare(f"{step}/connection", plan[step]["connection"], seen)
        await put_service(client, step, participant.url)

    # The deadline passes during the step's first attempt (it hangs past its timeout).
    for step in STEPS:
        participant.always(f"/deadline-{step}/{step}", Reply(delay=10.0))
    cases = [(step, "deadline") for step in STEPS]
    for (step, kind), seen in (await run_cases(client, "short", cases)).items():
        compare(f"{step}/{kind}", short[step][kind], seen)

    # The step's circuit is open (one failure opened it) and stays open past the deadline.
    for step in BEFORE_PIVOT:
        await put_service(client, step, participant.url, failure_threshold=1)
        participant.always("/trip", Reply(503))
        await trip(client, step)
        seen = (await run_cases(client, "short", [(step, "circuit_open")]))[(step, "circuit_open")]
        compare(f"{step}/circuit_open", short[step]["circuit_open"], seen)
        r = await client.post(f"/v1/admin/services/svc-{step}/circuit/reset", headers=ADMIN)
        assert r.status_code == 200, r.text
        await put_service(client, step, participant.url)

    assert not mismatches, "\n".join(mismatches)
    # The cases were not all alike: every outcome the plan knows was seen.
    thens = {entry[k]["then"] for entry in plan.values() for k in ("http_4xx", "timeout")}
    assert thens == {"compensate", "continue", "fallback", "dead_letter"}


async def trip(client: httpx.AsyncClient, step: str) -> None:
    """Open svc-<step>'s circuit (its threshold is 1) with one failed call."""
    doc = {
        "name": f"trip-{step}",
        "steps": [
            {
                "name": "trip",
                "action": {"service": f"svc-{step}", "path": "/trip"},
                "retry": {"max_attempts": 1},
            }
        ],
    }
    r = await client.post("/v1/definitions", json=doc)
    assert r.status_code in (200, 201), r.text
    saga = await start(client, f"trip-{step}")
    assert (await wait_terminal(client, saga["id"]))["status"] == "compensated"
    service = (await client.get(f"/v1/services/svc-{step}")).json()
    assert service["circuit_state"] == "open", service


async def test_past_the_pivot_an_open_circuit_is_waited_out(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """The plan's `wait`: the saga stays running, the step spends no attempt, long after
    the deadline."""
    client = orchestrator
    for step in STEPS:
        await put_service(client, step, participant.url)
    assert (await client.post("/v1/definitions", json=flow("short", 1, 1.0))).status_code == 201
    entry = (await plan_of(client, "short"))["mail"]["circuit_open"]
    assert (entry["then"], entry["final_status"], entry["attempts"]) == ("wait", "running", 0)

    await put_service(client, "mail", participant.url, failure_threshold=1)
    participant.always("/trip", Reply(503))
    await trip(client, "mail")
    saga = await start(client, "short", {"case": "circuit_open-mail"})
    await asyncio.sleep(3)  # three times the deadline
    saga = await get_saga(client, saga["id"])
    (mail,) = [s for s in saga["steps"] if s["name"] == "mail"]
    assert saga["status"] == "running", saga
    assert mail["attempts"] == 0
    assert [s["status"] for s in saga["steps"]][:5] == ["succeeded"] * 5
