"""Circuit breaker: opening, holding calls back, half-open probes, reset, sharing, fail-fast."""

from __future__ import annotations

import asyncio
import time

import httpx

from app.api.auth import Tokens
from app.core.breaker import WaitReason
from tests.conftest import ADMIN_TOKEN
from tests.support.isolation_helpers import (
    ADMIN,
    TimedParticipant,
    audit,
    breaker,
    call,
    define,
    eventually,
    extra_executor,
    fast_retry,
    finish,
    parse_time,
    participant_server,
    put_service,
    saga,
    saga_events,
    seconds_since,
    service,
    start,
    start_many,
    wait_all_terminal,
)
from tests.support.servers import Participant, Reply

ACTOR = Tokens.token_id(ADMIN_TOKEN)


async def _state_is(client: httpx.AsyncClient, name: str, state: str) -> dict | None:
    svc = await service(client, name)
    return svc if svc["circuit_state"] == state else None


async def _one_step(client: httpx.AsyncClient, name: str, svc: str, path: str = "/a") -> None:
    await define(
        client,
        name,
        [{"name": "a", "action": call(svc, path), "retry": fast_retry(max_attempts=200)}],
    )


async def test_circuit_opens_after_threshold_holds_calls_probes_and_resets(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    recovery = 2.5
    participant.always("/a", Reply(503))
    await put_service(orchestrator, "flaky", participant.url, circuit_breaker=breaker(3, recovery))
    await _one_step(orchestrator, "one", "flaky")
    saga_id = (await start(orchestrator, "one"))["id"]

    svc = await eventually(
        lambda: _state_is(orchestrator, "flaky", "open"), within=20, what="circuit open"
    )
    assert svc["consecutive_failures"] == 3, svc
    assert svc["opened_at"] is not None
    assert len(participant.to("/a")) == 3

    # While open: no calls at all, the saga keeps waiting and spends no attempts.
    window = recovery - seconds_since(svc["opened_at"]) - 0.5
    assert window > 0.5, f"too slow to observe the open window ({window:.2f}s left)"
    await asyncio.sleep(window)
    assert len(participant.to("/a")) == 3, "a call went out while the circuit was open"
    doc = await saga(orchestrator, saga_id)
    assert doc["status"] == "running", doc
    assert doc["steps"][0]["attempts"] == 3, doc["steps"][0]
    assert doc["steps"][0]["status"] in ("running", "pending"), doc["steps"][0]
    started = [
        e for e in await saga_events(orchestrator, saga_id) if e["type"] == "attempt_started"
    ]
    assert len(started) == 3

    # After the recovery timeout exactly one probe goes; it fails and the circuit reopens.
    first_opened = parse_time(svc["opened_at"])

    async def reopened() -> dict | None:
        s = await service(orchestrator, "flaky")
        moved = s["opened_at"] and parse_time(s["opened_at"]) > first_opened
        return s if s["circuit_state"] == "open" and moved else None

    svc2 = await eventually(reopened, within=recovery + 10, what="circuit reopened by the probe")
    assert svc2["consecutive_failures"] == 4, svc2
    assert len(participant.to("/a")) == 4, "more than one probe went out"
    doc = await saga(orchestrator, saga_id)
    assert doc["status"] == "running" and doc["steps"][0]["attempts"] == 4, doc

    # An operator resets the circuit: it closes at once and the waiting saga goes on.
    participant.always("/a", Reply(200, {"ok": True}))
    r = await orchestrator.post("/v1/admin/services/flaky/circuit/reset", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["circuit_state"] == "closed", body
    assert body["consecutive_failures"] == 0 and body["opened_at"] is None, body
    done = await finish(orchestrator, saga_id, seconds=20)
    assert done["status"] == "completed", done
    assert done["steps"][0]["attempts"] == 5
    assert len(participant.to("/a")) == 5

    entries = [e for e in await audit(orchestrator) if e["action"] == "circuit.reset"]
    assert len(entries) == 1, entries
    assert entries[0]["target"] == "flaky"
    assert entries[0]["actor"] == ACTOR
    assert entries[0]["at"]


async def test_client_errors_do_not_count_toward_opening(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.script("/a", Reply(503), Reply(503))
    participant.always("/a", Reply(400, {"error": "bad request"}))
    await put_service(orchestrator, "picky", participant.url, circuit_breaker=breaker(3, 30))
    await _one_step(orchestrator, "picky-flow", "picky")

    first = await finish(orchestrator, (await start(orchestrator, "picky-flow"))["id"])
    assert first["status"] == "compensated", first
    assert first["error"]["kind"] == "http_status", first["error"]
    assert first["steps"][0]["attempts"] == 3  # 503, 503, then a final 400

    for i in range(4):
        doc = await finish(orchestrator, (await start(orchestrator, "picky-flow", {"i": i}))["id"])
        assert doc["status"] == "compensated", doc
        assert doc["steps"][0]["attempts"] == 1

    svc = await service(orchestrator, "picky")
    assert svc["circuit_state"] == "closed", svc
    assert svc["consecutive_failures"] <= 2, svc
    assert svc["opened_at"] is None
    assert len(participant.to("/a")) == 7


async def test_half_open_lets_exactly_one_probe_through_for_fifty_waiting_sagas(
    api: httpx.AsyncClient, db_url: str
) -> None:
    recovery = 3.0
    async with participant_server(TimedParticipant) as p:
        p.always("/a", Reply(503))
        await put_service(
            api,
            "probed",
            p.url,
            max_concurrency=50,
            circuit_breaker=breaker(1, recovery, half_open=1),
        )
        await define(
            api,
            "opener",
            [{"name": "a", "action": call("probed", "/a"), "retry": fast_retry(max_attempts=1)}],
        )
        await _one_step(api, "probe-flow", "probed")

        # One saga fails and opens the circuit.
        async with extra_executor(db_url, "exec-opener"):
            opener = await finish(api, (await start(api, "opener"))["id"])
        assert opener["status"] == "compensated", opener
        svc = await service(api, "probed")
        assert svc["circuit_state"] == "open", svc
        opened = time.monotonic() - seconds_since(svc["opened_at"])

        # The participant recovers but answers slowly. 50 sagas queue up (no executor runs
        # while they are created), then two executors take them on.
        p.always("/a", Reply(200, {"ok": True}, delay=0.5))
        ids = await start_many(api, "probe-flow", 50)
        async with extra_executor(db_url, "exec-1") as e1, extra_executor(db_url, "exec-2") as e2:
            # Sample in_flight, then read the state: a sample taken before a half-open
            # reading was taken while the circuit was open or half-open.
            samples: list[int] = []
            deadline = time.monotonic() + recovery + 15
            while time.monotonic() < deadline:
                before = p.in_flight
                state = (await service(api, "probed"))["circuit_state"]
                if state == "half_open":
                    samples.append(before)
                elif state == "closed":
                    break
                await asyncio.sleep(0.01)
            assert samples, "never saw the circuit half-open"
            assert max(samples) <= 1, f"calls in flight while half-open: {samples}"
            docs = await wait_all_terminal(api, ids, seconds=60)
        assert [d["status"] for d in docs] == ["completed"] * 50
        svc = await service(api, "probed")
        assert svc["circuit_state"] == "closed" and svc["consecutive_failures"] == 0, svc

        # Exactly one probe: nothing else reached the participant while it was answered.
        spans = sorted(p.spans, key=lambda s: s.started)
        probe = spans[1]
        assert probe.started >= opened + recovery - 0.2, "a call went out while open"
        overlapping = [s for s in spans[2:] if s.started < probe.ended]
        assert probe.peak == 1 and overlapping == [], (
            f"{len(overlapping)} calls started while the half-open probe was in flight"
        )
        assert p.max_in_flight > 1  # once the probe closed the circuit, the rest flowed freely
        held = e1.denied(WaitReason.HALF_OPEN_BUSY) | e2.denied(WaitReason.HALF_OPEN_BUSY)
        assert held, "no saga was held back by the busy probe"
        assert {c.headers["x-saga-id"] for c in p.to("/a")[1:]} == set(ids)

        # Waiting spent no attempts: each saga's only finished attempt is its success.
        for saga_id in ids:
            history = await saga_events(api, saga_id)
            finished = [e["outcome"] for e in history if e["type"] == "attempt_finished"]
            assert finished == ["succeeded"], [
                (e["type"], e["attempt"], e["outcome"], e["worker"], e["at"], e["message"])
                for e in history
            ]


async def test_open_circuit_is_respected_by_every_executor(
    api: httpx.AsyncClient, db_url: str, participant: Participant
) -> None:
    recovery = 4.0
    participant.always("/a", Reply(503))
    await put_service(api, "shared", participant.url, circuit_breaker=breaker(3, recovery))
    await _one_step(api, "shared-flow", "shared")

    # Executor A sees the failures and opens the circuit, then is held back by it.
    async with extra_executor(db_url, "exec-a") as a:
        opener = (await start(api, "shared-flow"))["id"]
        svc = await eventually(lambda: _state_is(api, "shared", "open"), what="circuit open")
        await eventually(
            lambda: _async(opener in a.denied(WaitReason.CIRCUIT_OPEN)),
            what="executor A held back by the open circuit",
        )
        assert len(participant.to("/a")) == 3

    # Executor B never saw a failure, yet respects the circuit A opened.
    async with extra_executor(db_url, "exec-b") as b:
        others = await start_many(api, "shared-flow", 5)
        await eventually(
            lambda: _async(set(others) <= b.denied(WaitReason.CIRCUIT_OPEN)),
            what="executor B held back by the open circuit",
        )
        assert len(participant.to("/a")) == 3, "executor B called through an open circuit"
        assert seconds_since(svc["opened_at"]) < recovery, "too slow to observe the open window"

        participant.always("/a", Reply(200, {"ok": True}))
        async with extra_executor(db_url, "exec-a2"):
            docs = await wait_all_terminal(api, [opener, *others], seconds=40)
    assert [d["status"] for d in docs] == ["completed"] * 6
    assert len(participant.to("/a")) == 3 + 6
    assert (await saga(api, opener))["steps"][0]["attempts"] == 4
    for saga_id in others:
        assert (await saga(api, saga_id))["steps"][0]["attempts"] == 1


async def _async(value: object) -> object:
    return value


async def test_fail_fast_answers_503_while_open_and_201_when_closed(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    recovery = 30.0
    participant.always("/f", Reply(503))
    await put_service(orchestrator, "flaky", participant.url, circuit_breaker=breaker(1, recovery))
    await put_service(orchestrator, "good", participant.url)
    await _one_step(orchestrator, "ff", "flaky", "/f")
    await define(
        orchestrator,
        "good-first",
        [
            {"name": "g", "action": call("good", "/g")},
            {"name": "f", "action": call("flaky", "/f"), "retry": fast_retry(max_attempts=50)},
        ],
    )
    r = await orchestrator.post(
        "/v1/sagas", params={"fail_fast": "true"}, json={"definition": "ff"}
    )
    assert r.status_code == 201, r.text
    opener = r.json()["id"]
    await eventually(lambda: _state_is(orchestrator, "flaky", "open"), what="circuit open")

    r = await orchestrator.post(
        "/v1/sagas", params={"fail_fast": "true"}, json={"definition": "ff", "input": {"x": 1}}
    )
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(r.headers["retry-after"]) <= recovery
    problem = r.json()
    assert problem["status"] == 503 and problem["title"] and problem["detail"], problem
    listed = (await orchestrator.get("/v1/sagas", params={"definition": "ff"})).json()["items"]
    assert [s["id"] for s in listed] == [opener], "fail_fast still created a saga"

    # Without fail_fast the saga is accepted and waits; a definition whose first service
    # is healthy is accepted even with fail_fast.
    waiting = (await start(orchestrator, "ff", {"x": 2}))["id"]
    r = await orchestrator.post(
        "/v1/sagas", params={"fail_fast": "true"}, json={"definition": "good-first"}
    )
    assert r.status_code == 201, r.text
    other = r.json()["id"]

    participant.always("/f", Reply(200))
    r = await orchestrator.post("/v1/admin/services/flaky/circuit/reset", headers=ADMIN)
    assert r.status_code == 200, r.text
    r = await orchestrator.post(
        "/v1/sagas", params={"fail_fast": "true"}, json={"definition": "ff", "input": {"x": 3}}
    )
    assert r.status_code == 201, r.text
    docs = await wait_all_terminal(orchestrator, [opener, waiting, other, r.json()["id"]])
    assert [d["status"] for d in docs] == ["completed"] * 4


async def test_deadline_passing_while_circuit_open_compensates_with_circuit_open(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/f", Reply(503))
    await put_service(orchestrator, "flaky", participant.url, circuit_breaker=breaker(1, 30))
    await put_service(orchestrator, "good", participant.url)
    await _one_step(orchestrator, "opener", "flaky", "/f")
    await define(
        orchestrator,
        "timed",
        [
            {
                "name": "g",
                "action": call("good", "/g"),
                "compensation": call("good", "/g/undo"),
            },
            {
                "name": "f",
                "action": call("flaky", "/f"),
                "compensation": call("flaky", "/f/undo"),
                "retry": fast_retry(max_attempts=100),
            },
        ],
        timeout_seconds=1.5,
    )
    await start(orchestrator, "opener")
    await eventually(lambda: _state_is(orchestrator, "flaky", "open"), what="circuit open")

    t0 = time.monotonic()
    doc = await finish(orchestrator, (await start(orchestrator, "timed"))["id"], seconds=20)
    assert time.monotonic() - t0 >= 1.4
    assert doc["status"] == "compensated", doc
    assert doc["error"]["kind"] == "circuit_open", doc["error"]
    assert doc["error"]["step"] == "f", doc["error"]
    g, f = doc["steps"]
    assert g["status"] == "compensated", g
    assert f["attempts"] == 0 and f["status"] == "pending", f
    assert len(participant.to("/f")) == 1  # only the opener's call
    assert participant.to("/f/undo") == []
    assert len(participant.to("/g/undo")) == 1
