"""`serve` hands a new saga to its own executor in the statement that creates it, and
starts the first step's first attempt there too when that attempt's guards hold (the
service as the executor last saw it, breaker closed, a free bulkhead slot): one round
trip from the request to the first call. When a guard fails, nothing of the attempt is
written and the executor starts it the usual way."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import wait_terminal
from tests.support.engine_helpers import define, events, put_service, run, start, step, step_of
from tests.support.servers import Participant, Reply


async def test_the_creating_statement_starts_the_first_attempt(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "fold", [step("a"), step("b")])
    warm = await run(orchestrator, "fold", {})  # the executor now knows the service
    assert warm["status"] == "completed", warm

    saga = await start(orchestrator, "fold", {})
    first = step_of(saga, "a")
    assert (first["status"], first["attempts"]) == ("running", 1), saga
    assert first["started_at"] == saga["created_at"]
    assert step_of(saga, "b")["status"] == "pending"
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "completed", done
    assert [step_of(done, n)["attempts"] for n in "ab"] == [1, 1]
    history = [(e["type"], e["step"], e["attempt"]) for e in await events(orchestrator, saga["id"])]
    assert history == [
        ("saga_started", None, None),
        ("attempt_started", "a", 1),
        ("attempt_finished", "a", 1),
        ("attempt_started", "b", 1),
        ("attempt_finished", "b", 1),
        ("saga_completed", None, None),
    ]
    sent = [
        c for c in participant.calls if c.headers.get("idempotency-key", "").startswith(saga["id"])
    ]
    assert sorted(c.path for c in sent) == ["/a", "/b"]


async def test_no_free_slot_leaves_the_first_attempt_to_the_executor(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """The only slot is held by a slow call: the new saga is created with nothing
    started, and its first attempt starts once the slot is free."""
    await put_service(orchestrator, participant.url, max_concurrency=1)
    await define(orchestrator, "narrow", [step("a")])
    warm = await run(orchestrator, "narrow", {})
    assert warm["status"] == "completed", warm
    participant.script("/a", Reply(200, {"ok": True}, delay=1.0))
    slow = await start(orchestrator, "narrow", {})
    assert step_of(slow, "a")["status"] == "running"
    await asyncio.sleep(0.2)  # its call is in flight, holding the slot
    waiting = await start(orchestrator, "narrow", {})
    assert (step_of(waiting, "a")["status"], step_of(waiting, "a")["attempts"]) == (
        "pending",
        0,
    ), waiting
    for saga in (slow, waiting):
        done = await wait_terminal(orchestrator, saga["id"], seconds=30)
        assert done["status"] == "completed", done
        assert step_of(done, "a")["attempts"] == 1
