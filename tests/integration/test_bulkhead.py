"""Bulkhead: a service's max_concurrency holds across executors, and a saturated service
does not slow down sagas on a healthy one."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from tests.support.isolation_helpers import (
    breaker,
    call,
    define,
    eventually,
    extra_executor,
    finish,
    latency,
    p95,
    participant_server,
    put_service,
    saga_events,
    service,
    start,
    start_many,
    wait_all_terminal,
)
from tests.support.servers import Participant, Reply

SLOW_SAGAS = 20
LATENCY_SAMPLES = 20


async def _healthy_latencies(client: httpx.AsyncClient, n: int) -> list[float]:
    """Run `n` sagas on the healthy service one after another; their latencies (DB clock)."""
    out = []
    for i in range(n):
        doc = await finish(client, (await start(client, "fast-flow", {"i": i}))["id"], seconds=20)
        assert doc["status"] == "completed", doc
        out.append(latency(doc))
    return out


async def test_bulkhead_caps_concurrency_across_executors_and_isolates_healthy_service(
    api: httpx.AsyncClient, db_url: str
) -> None:
    # The API alone and two executors: each saga goes to whichever claims it first (an
    # API with its own executor would hand it every new saga it has room for).
    orchestrator = api
    async with (
        participant_server(Participant) as slow,
        participant_server(Participant) as fast,
        # Neither can hold all the sagas at once, so both take part however they race.
        extra_executor(db_url, "exec-one", concurrency=SLOW_SAGAS // 3),
        extra_executor(db_url, "exec-extra", concurrency=SLOW_SAGAS // 3),
    ):
        slow.always("/work", Reply(200, {"ok": True}, delay=0.3))
        await put_service(
            orchestrator, "slow", slow.url, max_concurrency=2, circuit_breaker=breaker()
        )
        await put_service(orchestrator, "fast", fast.url, circuit_breaker=breaker())
        await define(orchestrator, "slow-flow", [{"name": "w", "action": call("slow", "/work")}])
        await define(orchestrator, "fast-flow", [{"name": "p", "action": call("fast", "/ping")}])

        alone = await _healthy_latencies(orchestrator, LATENCY_SAMPLES)

        # Saturate the slow service, watching its reported in_flight meanwhile.
        reported: list[int] = []

        async def watch() -> None:
            while True:
                reported.append((await service(orchestrator, "slow"))["in_flight"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            slow_ids = await start_many(orchestrator, "slow-flow", SLOW_SAGAS)
            await eventually(
                lambda: _true(slow.in_flight >= 1), within=20, what="slow calls started"
            )
            during = await _healthy_latencies(orchestrator, LATENCY_SAMPLES)
            unfinished_slow = len({c.headers["x-saga-id"] for c in slow.calls}) < SLOW_SAGAS
            docs = await wait_all_terminal(orchestrator, slow_ids, seconds=60)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        assert [d["status"] for d in docs] == ["completed"] * SLOW_SAGAS

        # Never more than max_concurrency calls at once, across both executors.
        # (every saga called once; a call may repeat only if a lease was lost under load)
        assert {c.headers["x-saga-id"] for c in slow.to("/work")} == set(slow_ids)
        assert slow.max_in_flight <= 2, f"{slow.max_in_flight} concurrent calls (limit 2)"
        assert slow.max_in_flight == 2, "the bulkhead never allowed its 2 concurrent calls"
        assert reported and max(reported) <= 2, f"GET /v1/services/slow in_flight: {reported}"
        assert max(reported) >= 1, reported

        # Both executors took part.
        workers = set()
        for saga_id in slow_ids:
            for e in await saga_events(orchestrator, saga_id):
                if e["type"] == "attempt_started":
                    workers.add(e["worker"])
        assert "exec-extra" in workers and len(workers) == 2, workers

        # The healthy service kept its latency while the slow one was saturated.
        assert unfinished_slow, "the slow service was no longer saturated while measuring"
        bound = 2 * p95(alone) + 0.5
        assert p95(during) <= bound, (
            f"healthy p95 {p95(during):.3f}s during saturation vs {p95(alone):.3f}s alone"
        )
        svc = await service(orchestrator, "slow")
        assert svc["in_flight"] == 0 and svc["circuit_state"] == "closed", svc


async def _true(value: bool) -> bool:
    return value
