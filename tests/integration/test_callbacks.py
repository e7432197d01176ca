"""Callback steps (contract §8): a participant answers 202 and reports later to
`POST /v1/callbacks/{token}`; reports, repeats, conflicts, timeouts with a new token,
a report racing the timeout, cancel and deadline while waiting."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, wait_terminal
from tests.support.engine_helpers import (
    define,
    events,
    fast_retry,
    get_saga,
    put_service,
    start,
    step,
    step_of,
    wait_until,
)
from tests.support.servers import Participant, Received, Reply

HEADER = "x-saga-callback-url"


def token_of(call: Received) -> str:
    url = call.headers[HEADER]
    assert "/v1/callbacks/" in url, url
    return url.rsplit("/v1/callbacks/", 1)[1]


async def report(client: httpx.AsyncClient, token: str, body: dict[str, Any]) -> httpx.Response:
    # No bearer token: the callback URL's token is the credential.
    return await client.post(f"/v1/callbacks/{token}", json=body, headers={"Authorization": ""})


def callback_step(name: str = "charge", timeout: float = 30, **extra: Any) -> dict[str, Any]:
    return step(name, callback={"timeout_seconds": timeout}, **extra)


async def _define(
    client: httpx.AsyncClient, participant: Participant, *steps: dict[str, Any], **extra: Any
) -> None:
    await put_service(client, participant.url)
    await define(client, "pay", list(steps), **extra)


async def waiting(client: httpx.AsyncClient, saga_id: str, name: str = "charge") -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def is_waiting() -> bool:
        found.update(step_of(await get_saga(client, saga_id), name))
        return found["status"] == "waiting"

    await wait_until(is_waiting, what=f"{name} waiting")
    return found


async def test_accepted_call_waits_then_a_report_completes_the_step(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(
        orchestrator,
        participant,
        callback_step(),
        step("ship", body={"charge": "${steps.charge.response.charge_id}"}),
    )
    participant.script("/charge", Reply(202, {"accepted": True}))
    saga = await start(orchestrator, "pay", {"amount": 5})
    charge = await waiting(orchestrator, saga["id"])
    assert charge["attempts"] == 1 and charge["status_code"] == 202
    due = datetime.fromisoformat(charge["callback_due_at"])
    assert 25 < (due - datetime.now(UTC)).total_seconds() <= 30  # the step's timeout
    (call,) = participant.to("/charge")
    assert call.headers["idempotency-key"] == f"{saga['id']}:charge:action"
    token = token_of(call)
    assert len(token) >= 22  # at least 128 random bits, URL-safe
    await asyncio.sleep(0.3)
    assert participant.to("/ship") == []  # nothing goes on while the step waits

    r = await report(orchestrator, token, {"status": "succeeded", "response": {"charge_id": "c-9"}})
    assert r.status_code == 200, r.text
    assert r.json() == {"saga_id": saga["id"], "step": "charge", "status": "succeeded"}
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "completed", done
    charge = step_of(done, "charge")
    assert charge["status"] == "succeeded" and charge["response"] == {"charge_id": "c-9"}
    assert charge["callback_due_at"] is None
    assert charge["attempts"] == 1
    (ship,) = participant.to("/ship")
    assert ship.body == {"charge": "c-9"}
    assert HEADER not in ship.headers  # only a callback step's action carries the URL

    # The same report again: an idempotent 200; a different one: 409.
    again = await report(
        orchestrator, token, {"status": "succeeded", "response": {"charge_id": "c-9"}}
    )
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    other = await report(orchestrator, token, {"status": "failed", "error": "declined"})
    assert other.status_code == 409, other.text
    assert other.headers["content-type"].startswith("application/problem+json")

    history = [(e["type"], e.get("outcome")) for e in await events(orchestrator, saga["id"])]
    assert ("attempt_finished", "accepted") in history
    assert ("callback_reported", None) in history
    assert history.index(("attempt_finished", "accepted")) < history.index(
        ("callback_reported", None)
    )


async def test_a_direct_2xx_completes_a_callback_step_and_closes_its_token(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, callback_step())
    participant.script("/charge", Reply(201, {"charge_id": "now"}))
    saga = await start(orchestrator, "pay", {})
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "completed"
    assert step_of(done, "charge")["response"] == {"charge_id": "now"}
    late = await report(
        orchestrator, token_of(participant.to("/charge")[0]), {"status": "succeeded"}
    )
    assert late.status_code == 409, late.text


async def test_a_failed_report_compensates_the_saga_this_step_included(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, step("reserve"), callback_step())
    participant.script("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    await waiting(orchestrator, saga["id"])
    token = token_of(participant.to("/charge")[0])
    r = await report(orchestrator, token, {"status": "failed", "error": "card declined"})
    assert r.status_code == 200, r.text
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "compensated", done
    assert done["error"]["kind"] == "callback_failed"
    assert "card declined" in done["error"]["message"]
    assert step_of(done, "charge")["status"] == "compensated"
    assert len(participant.to("/charge/undo")) == 1
    assert len(participant.to("/reserve/undo")) == 1
    assert step_of(done, "charge")["attempts"] == 1  # a reported failure is final


async def test_no_report_in_time_retries_with_the_same_key_and_a_new_token(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, callback_step(timeout=1))
    participant.always("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})

    async def second_attempt() -> bool:
        return len(participant.to("/charge")) >= 2

    await wait_until(second_attempt, seconds=20, what="a second attempt")
    first, second = participant.to("/charge")[:2]
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert token_of(first) != token_of(second)
    assert second.headers["x-saga-attempt"] == "2"
    assert second.at - first.at >= 0.9  # the first attempt waited out its timeout

    stale = await report(orchestrator, token_of(first), {"status": "succeeded"})
    assert stale.status_code == 409, stale.text
    assert "new callback URL" in stale.json()["detail"]
    await waiting(orchestrator, saga["id"])
    fresh = await report(orchestrator, token_of(second), {"status": "succeeded", "response": 7})
    assert fresh.status_code == 200, fresh.text
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "completed"
    assert step_of(done, "charge")["response"] == 7
    timeouts = [
        e
        for e in await events(orchestrator, saga["id"])
        if e["type"] == "attempt_finished" and e.get("error_kind") == "timeout"
    ]
    assert timeouts and "no callback report within 1 s" in timeouts[0]["message"]


async def test_exhausted_waits_compensate_with_an_unknown_outcome(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(
        orchestrator, participant, callback_step(timeout=1, retry=fast_retry(max_attempts=2))
    )
    participant.always("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    done = await wait_terminal(orchestrator, saga["id"], seconds=30)
    assert done["status"] == "compensated", done
    assert done["error"]["kind"] == "timeout"
    charge = step_of(done, "charge")
    assert charge["attempts"] == 2
    # Outcome unknown: the participant may have done it, so its compensation ran.
    assert len(participant.to("/charge/undo")) == 1


async def test_unknown_tokens_and_bad_reports(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    unknown = await report(orchestrator, "A" * 43, {"status": "succeeded"})
    assert unknown.status_code == 404, unknown.text
    assert unknown.headers["content-type"].startswith("application/problem+json")
    for body in (
        {"status": "maybe"},
        {"status": "failed"},  # a failure needs its reason
        {"status": "succeeded", "error": "x"},
        {"status": "failed", "error": "x", "response": 1},
        {"status": "succeeded", "extra": 1},
    ):
        r = await report(orchestrator, "A" * 43, body)
        assert r.status_code == 422, (body, r.text)
    bad = await orchestrator.post("/v1/callbacks/" + "%00", json={"status": "succeeded"})
    assert 400 <= bad.status_code < 500, bad.text


async def test_a_report_needs_no_bearer_token(
    db_url: str, participant: Participant, settings_factory: Any
) -> None:
    from app.main import create_app
    from tests.support.servers import serve

    token = "api-token-0123456789abcdef"
    app = create_app(settings_factory(SAGA_API_TOKEN=token), db_url, run_executor=True)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with serve(app) as base, httpx.AsyncClient(base_url=base, headers=auth) as client:
        await _define(client, participant, callback_step())
        participant.script("/charge", Reply(202))
        saga = await start(client, "pay", {})
        await waiting(client, saga["id"])
        async with httpx.AsyncClient(base_url=base) as anonymous:
            r = await report(
                anonymous, token_of(participant.to("/charge")[0]), {"status": "succeeded"}
            )
            assert r.status_code == 200, r.text
            # The rest of the API still needs the token.
            assert (await anonymous.get(f"/v1/sagas/{saga['id']}")).status_code == 401
        assert (await wait_terminal(client, saga["id"]))["status"] == "completed"


async def test_a_report_that_beats_the_accepting_answer_is_taken(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, callback_step())
    answers: list[int] = []

    async def report_first(call: Received) -> None:
        r = await report(orchestrator, token_of(call), {"status": "succeeded", "response": "early"})
        answers.append(r.status_code)

    participant.hooks["/charge"] = report_first
    participant.script("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    done = await wait_terminal(orchestrator, saga["id"])
    assert answers == [200]
    assert done["status"] == "completed", done
    assert step_of(done, "charge")["response"] == "early"
    assert len(participant.to("/charge")) == 1


async def test_a_report_taken_during_a_failing_call_is_the_outcome(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """The participant reported, then its answer was lost (a 503): the report wins."""
    await _define(orchestrator, participant, callback_step())

    async def report_first(call: Received) -> None:
        await report(orchestrator, token_of(call), {"status": "succeeded", "response": "done"})

    participant.hooks["/charge"] = report_first
    participant.script("/charge", Reply(503))
    saga = await start(orchestrator, "pay", {})
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "completed", done
    assert step_of(done, "charge")["response"] == "done"
    assert len(participant.to("/charge")) == 1


async def test_cancel_while_waiting_unwinds_the_waiting_step(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, step("reserve"), callback_step())
    participant.script("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    await waiting(orchestrator, saga["id"])
    r = await orchestrator.post(f"/v1/sagas/{saga['id']}/cancel")
    assert r.status_code == 202, r.text
    done = await wait_terminal(orchestrator, saga["id"])
    assert done["status"] == "compensated", done
    assert done["error"]["kind"] == "cancelled"
    # The waiting step's outcome is unknown: it is compensated too, then the earlier one.
    assert [c.path for c in participant.calls][-2:] == ["/charge/undo", "/reserve/undo"]
    late = await report(
        orchestrator, token_of(participant.to("/charge")[0]), {"status": "succeeded"}
    )
    assert late.status_code == 409, late.text


async def test_the_deadline_ends_a_wait(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, callback_step(timeout=600), timeout_seconds=1.5)
    participant.script("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    done = await wait_terminal(orchestrator, saga["id"], seconds=20)
    assert done["status"] == "compensated", done
    assert done["error"]["kind"] == "deadline"
    assert len(participant.to("/charge/undo")) == 1


async def test_a_waiting_pivot_cannot_be_cancelled(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _define(orchestrator, participant, callback_step(pivot=True))
    participant.script("/charge", Reply(202))
    saga = await start(orchestrator, "pay", {})
    await waiting(orchestrator, saga["id"])
    r = await orchestrator.post(f"/v1/sagas/{saga['id']}/cancel")
    assert r.status_code == 409, r.text
    ok = await report(orchestrator, token_of(participant.to("/charge")[0]), {"status": "succeeded"})
    assert ok.status_code == 200
    assert (await wait_terminal(orchestrator, saga["id"]))["status"] == "completed"


@pytest.mark.parametrize("round_", range(3))
async def test_a_report_racing_the_timeout_has_exactly_one_outcome(
    orchestrator: httpx.AsyncClient, participant: Participant, round_: int
) -> None:
    """Reports land around the wait's due time: each is either taken (and the step
    succeeds with it, on its first attempt) or refused (and a second attempt follows)."""
    await _define(orchestrator, participant, callback_step(timeout=1))
    participant.always("/charge", Reply(202))
    n = 12
    sagas = [await start(orchestrator, "pay", {"i": i}) for i in range(n)]
    ids = [s["id"] for s in sagas]

    async def all_called() -> bool:
        return len({c.headers["x-saga-id"] for c in participant.to("/charge")}) == n

    await wait_until(all_called, what="every first attempt")
    firsts = {c.headers["x-saga-id"]: c for c in participant.to("/charge")[:n]}

    async def race(i: int, saga_id: str) -> int:
        call = firsts[saga_id]
        await asyncio.sleep(max(0.0, call.at + 0.8 + 0.03 * i - time.monotonic()))
        r = await report(orchestrator, token_of(call), {"status": "succeeded", "response": "first"})
        assert r.status_code in (200, 409), r.text
        return r.status_code

    answers: dict[str, int] = dict(
        zip(ids, await asyncio.gather(*(race(i, s) for i, s in enumerate(ids))), strict=True)
    )
    for saga_id, status in answers.items():
        if status == 409:  # refused: the wait was over; the retry has a new token

            async def retried(saga_id: str = saga_id) -> bool:
                return (
                    sum(c.headers["x-saga-id"] == saga_id for c in participant.to("/charge")) >= 2
                )

            await wait_until(retried, what="the retry after a refused report")
            again = [c for c in participant.to("/charge") if c.headers["x-saga-id"] == saga_id][1]
            await waiting(orchestrator, saga_id)
            ok = await report(
                orchestrator, token_of(again), {"status": "succeeded", "response": "second"}
            )
            assert ok.status_code == 200, ok.text
    for saga_id, status in answers.items():
        done = await wait_terminal(orchestrator, saga_id)
        charge = step_of(done, "charge")
        assert done["status"] == "completed", done
        if status == 200:
            assert charge["response"] == "first" and charge["attempts"] == 1, charge
        else:
            assert charge["response"] == "second" and charge["attempts"] >= 2, charge
