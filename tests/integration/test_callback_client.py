"""The typed client's side of callback steps (app.client): a participant reports to the
full URL its call carried, with `report()` or one pooled `CallbackReporter`, without a
bearer token; 404 and 409 are `ApiError`s with the problem; `callback_due` reads a
waiting step's `callback_due_at`. Against a live orchestrator whose SAGA_PUBLIC_URL is
its own address, so the header's URL is used as it is."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.client import (
    CALLBACK_URL_HEADER,
    ApiError,
    CallbackReporter,
    SagaClient,
    callback_due,
    report,
    report_body,
    waiting_steps,
)
from tests.conftest import ADMIN_TOKEN
from tests.support.engine_helpers import define, put_service, step, wait_until
from tests.support.servers import Participant, Reply, free_port, serve

API_TOKEN = "client-api-token-0123456789abcdef"


@pytest.fixture
async def live(
    db_url: str, settings_factory: Callable[..., Any]
) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """`serve`-like: API and executor, a bearer token required, callbacks to itself."""
    from app.main import create_app

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = settings_factory(SAGA_API_TOKEN=API_TOKEN, SAGA_PUBLIC_URL=base)
    app = create_app(settings, db_url, run_executor=True)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        serve(app, port=port),
        httpx.AsyncClient(base_url=base, headers=auth, timeout=40) as admin,
    ):
        yield base, admin


async def _waiting_saga(
    base: str, admin: httpx.AsyncClient, participant: Participant, client: SagaClient, **input_: Any
) -> tuple[dict[str, Any], str]:
    """A saga whose `charge` waits for its callback; the saga and the URL its call carried."""
    started = await client.start_saga("pay", {"n": len(participant.to("/charge")), **input_})
    saga_id = started.saga["id"]
    seen: dict[str, Any] = {}

    async def is_waiting() -> bool:
        seen.update(await client.get_saga(saga_id))
        return waiting_steps(seen) == ["charge"]

    await wait_until(is_waiting, what="charge waiting")
    (call,) = [c for c in participant.to("/charge") if c.headers["x-saga-id"] == saga_id]
    url = call.headers[CALLBACK_URL_HEADER.lower()]
    assert url.startswith(f"{base}/v1/callbacks/"), "the URL names the orchestrator's address"
    return seen, url


async def _setup(admin: httpx.AsyncClient, participant: Participant, wait_for: float = 30) -> None:
    await put_service(admin, participant.url)
    await define(
        admin,
        "pay",
        [
            step("charge", callback={"timeout_seconds": wait_for}),
            step("ship", body={"charge": "${steps.charge.response.charge_id}"}),
        ],
    )


async def test_report_completes_a_waiting_step_and_repeats_are_answered_the_same(
    live: tuple[str, httpx.AsyncClient], participant: Participant
) -> None:
    base, admin = live
    await _setup(admin, participant)
    participant.always("/charge", Reply(202, {"accepted": True}))
    async with SagaClient(base, API_TOKEN, retry_for_seconds=2) as client:
        saga, url = await _waiting_saga(base, admin, participant, client)
        due = callback_due(saga, "charge")
        assert due is not None
        assert 25 < (due - datetime.now(UTC)).total_seconds() <= 30
        assert callback_due(saga, "ship") is None

        # The module-level helper: no bearer token, the full URL from the header.
        answer = await report(url, "succeeded", {"charge_id": "ch-1"})
        assert answer == {"saga_id": saga["id"], "step": "charge", "status": "succeeded"}
        done = await client.wait(saga["id"], within=20)
        assert done["status"] == "completed", done
        charge = next(s for s in done["steps"] if s["name"] == "charge")
        assert charge["response"] == {"charge_id": "ch-1"} and charge["callback_due_at"] is None
        assert callback_due(done, "charge") is None and waiting_steps(done) == []
        (ship,) = participant.to("/ship")
        assert ship.body == {"charge": "ch-1"}

        async with CallbackReporter(retry_for_seconds=1) as reporter:
            # The same report again: taken already, answered the same (idempotent).
            again = await reporter.report(url, "succeeded", {"charge_id": "ch-1"})
            assert again == answer
            # A different report for that attempt: 409, with the problem document.
            with pytest.raises(ApiError) as conflict:
                await reporter.report(url, "failed", error="declined after all")
            assert conflict.value.status == 409
            assert conflict.value.problem["status"] == 409
            # A token nobody was given: 404.
            unknown = url.rsplit("/", 1)[0] + "/" + "A" * 43
            with pytest.raises(ApiError) as missing:
                await reporter.report(unknown, "succeeded")
            assert missing.value.status == 404 and missing.value.problem["detail"]


async def test_a_failed_report_compensates_and_one_reporter_serves_many_reports(
    live: tuple[str, httpx.AsyncClient], participant: Participant
) -> None:
    base, admin = live
    await _setup(admin, participant)
    participant.always("/charge", Reply(202))
    async with (
        SagaClient(base, API_TOKEN, retry_for_seconds=2) as client,
        CallbackReporter() as reporter,
    ):
        declined, declined_url = await _waiting_saga(base, admin, participant, client)
        paid, paid_url = await _waiting_saga(base, admin, participant, client)
        taken = await reporter.report(declined_url, "failed", error="card declined")
        assert taken["status"] == "failed" and taken["saga_id"] == declined["id"]
        assert (await reporter.report(paid_url, "succeeded", {"charge_id": "x"}))["status"] == (
            "succeeded"
        )
        gone = await client.wait(declined["id"], within=20)
        assert gone["status"] == "compensated", gone
        assert gone["error"]["kind"] == "callback_failed"
        assert "card declined" in gone["error"]["message"]
        assert (await client.wait(paid["id"], within=20))["status"] == "completed"


async def test_a_report_after_the_wait_timed_out_is_a_409_and_the_new_url_works(
    live: tuple[str, httpx.AsyncClient], participant: Participant
) -> None:
    base, admin = live
    await _setup(admin, participant, wait_for=1)
    participant.always("/charge", Reply(202))
    async with SagaClient(base, API_TOKEN, retry_for_seconds=2) as client:
        saga, first_url = await _waiting_saga(base, admin, participant, client)

        async def retried() -> bool:
            return len(participant.to("/charge")) >= 2

        await wait_until(retried, what="the retry after the wait timed out")
        second = participant.to("/charge")[1]
        new_url = second.headers[CALLBACK_URL_HEADER.lower()]
        assert new_url != first_url
        with pytest.raises(ApiError) as stale:
            await report(first_url, "succeeded", retry_for_seconds=1)
        assert stale.value.status == 409
        assert "new callback URL" in stale.value.problem["detail"]
        assert (await report(new_url, "succeeded", {"charge_id": "late"}))["status"] == (
            "succeeded"
        )
        done = await client.wait(saga["id"], within=20)
        assert done["status"] == "completed", done


async def test_a_report_is_retried_while_the_orchestrator_is_unreachable() -> None:
    """A report is safe to repeat, so transport errors and 503s are retried."""
    answers = [Reply(503, {"detail": "restarting"}), Reply(200, {"saga_id": "s", "step": "c"})]
    p = Participant()
    p.script("/v1/callbacks/tok", *answers)
    async with serve(p.app) as url:
        answer = await report(f"{url}/v1/callbacks/tok", "succeeded", 1, retry_for_seconds=10)
    assert answer == {"saga_id": "s", "step": "c"}
    calls = p.to("/v1/callbacks/tok")
    assert [c.body for c in calls] == [{"status": "succeeded", "response": 1}] * 2
    assert all("authorization" not in c.headers for c in calls)  # no bearer token is sent


def test_report_bodies_have_the_contracts_two_shapes() -> None:
    assert report_body("succeeded") == {"status": "succeeded", "response": None}
    assert report_body("succeeded", {"a": 1}) == {"status": "succeeded", "response": {"a": 1}}
    assert report_body("failed", error="no") == {"status": "failed", "error": "no"}
    for bad in (
        lambda: report_body("failed"),
        lambda: report_body("failed", 1, "x"),
        lambda: report_body("succeeded", error="x"),
        lambda: report_body("maybe"),
    ):
        with pytest.raises(ValueError):
            bad()
