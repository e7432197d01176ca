"""The checkout example's participants (examples.checkout) keep the participant contract:
they dedupe on the Idempotency-Key in the effect's transaction, answer a compensation
for an action that never happened with a no-op 2xx, and misbehave on demand (/_chaos).

Each runs over real HTTP against the test's fresh database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from examples.checkout import (
    create_inventory_app,
    create_notifications_app,
    create_orders_app,
    create_payments_app,
)
from tests.support.servers import Participant as Recorder
from tests.support.servers import Reply, serve

ITEMS = [{"sku": "coffee-1kg", "qty": 2}]


@dataclass(frozen=True)
class Case:
    """One action of one participant, what it counts, and how it is undone (if it is)."""

    id: str
    factory: Callable[[str], FastAPI]
    path: str
    body: Callable[[str], dict[str, Any]]
    counted: str
    undo_path: str | None = None
    undone: str | None = None  # the count that goes up when the action is undone


CASES = [
    Case(
        "payments-charge",
        create_payments_app,
        "/charges",
        lambda ref: {"amount": 42.5, "order_ref": ref},
        "charges",
        "/refunds",
        "charges_refunded",
    ),
    Case(
        "payments-fraud-score",
        create_payments_app,
        "/fraud-score",
        lambda ref: {"amount": 42.5, "order_ref": ref},
        "fraud_checks",
    ),
    Case(
        "orders",
        create_orders_app,
        "/orders",
        lambda ref: {"order_ref": ref, "charge_id": "ch_1", "items": ITEMS, "fraud_score": 3},
        "orders",
        "/orders/cancel",
        "orders_cancelled",
    ),
    Case(
        "inventory",
        create_inventory_app,
        "/reservations",
        lambda ref: {"order_ref": ref, "items": ITEMS},
        "reservations",
        "/reservations/release",
        "reservations_released",
    ),
    Case(
        "notifications",
        create_notifications_app,
        "/emails",
        lambda ref: {"to": "ada@example.com", "order_ref": ref, "order_id": "ord_1"},
        "emails",
    ),
]
UNDOABLE = [c for c in CASES if c.undo_path is not None]
Starter = Callable[[Case], AbstractAsyncContextManager[httpx.AsyncClient]]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


@pytest.fixture(params=CASES, ids=_ids(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    result: Case = request.param
    return result


@pytest.fixture(params=UNDOABLE, ids=_ids(UNDOABLE))
def undoable(request: pytest.FixtureRequest) -> Case:
    result: Case = request.param
    return result


@pytest.fixture
def started(db_url: str) -> Starter:
    @contextlib.asynccontextmanager
    async def start(c: Case) -> AsyncIterator[httpx.AsyncClient]:
        async with (
            serve(c.factory(db_url)) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as client,
        ):
            yield client

    return start


async def counts(client: httpx.AsyncClient, ref: str | None = None) -> dict[str, int]:
    params = {"order_ref": ref} if ref else {}
    r = await client.get("/_effects", params=params)
    assert r.status_code == 200, r.text
    result: dict[str, int] = r.json()["counts"]
    return result


def key() -> str:
    return f"{uuid.uuid4()}:step:action"


async def test_concurrent_identical_calls_make_one_effect(case: Case, started: Starter) -> None:
    async with started(case) as client:
        ref, idem = str(uuid.uuid4()), key()
        responses = await asyncio.gather(
            *(
                client.post(case.path, json=case.body(ref), headers={"Idempotency-Key": idem})
                for _ in range(20)
            )
        )
        assert all(200 <= r.status_code < 300 for r in responses), [r.text for r in responses]
        assert len({(r.status_code, r.text) for r in responses}) == 1, "answers differ"
        replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
        assert len(replayed) == 19
        assert (await counts(client, ref))[case.counted] == 1
        assert (await counts(client))[case.counted] == 1

        # Later retries with the key get the same answer and still change nothing.
        again = await client.post(case.path, json=case.body(ref), headers={"Idempotency-Key": idem})
        assert (again.status_code, again.text) == (responses[0].status_code, responses[0].text)
        assert (await counts(client))[case.counted] == 1

        # Another key is another effect.
        other = await client.post(
            case.path, json=case.body(ref), headers={"Idempotency-Key": key()}
        )
        assert 200 <= other.status_code < 300
        assert (await counts(client, ref))[case.counted] == 2


async def test_key_is_required_and_bound_to_its_request(case: Case, started: Starter) -> None:
    async with started(case) as client:
        ref, idem = str(uuid.uuid4()), key()
        missing = await client.post(case.path, json=case.body(ref))
        assert missing.status_code == 400
        assert "Idempotency-Key" in missing.json()["detail"]
        first = await client.post(case.path, json=case.body(ref), headers={"Idempotency-Key": idem})
        assert 200 <= first.status_code < 300
        reused = await client.post(
            case.path, json=case.body(str(uuid.uuid4())), headers={"Idempotency-Key": idem}
        )
        assert reused.status_code == 422
        assert (await counts(client))[case.counted] == 1


async def test_compensation_of_action_that_never_happened_is_a_no_op(
    undoable: Case, started: Starter
) -> None:
    async with started(undoable) as client:
        done = str(uuid.uuid4())
        r = await client.post(
            undoable.path, json=undoable.body(done), headers={"Idempotency-Key": key()}
        )
        assert r.status_code == 201
        before = await counts(client)

        never = str(uuid.uuid4())
        assert undoable.undo_path is not None
        undo = await client.post(
            undoable.undo_path, json={"order_ref": never}, headers={"Idempotency-Key": key()}
        )
        assert undo.status_code == 200, undo.text
        assert await counts(client) == before
        assert await counts(client, never) == dict.fromkeys(before, 0)

        # The action arriving late (after its compensation) is refused, not applied.
        late = await client.post(
            undoable.path, json=undoable.body(never), headers={"Idempotency-Key": key()}
        )
        assert late.status_code == 409, late.text
        assert await counts(client) == before


async def test_compensation_undoes_the_action_once(undoable: Case, started: Starter) -> None:
    assert undoable.undo_path is not None and undoable.undone is not None
    async with started(undoable) as client:
        ref = str(uuid.uuid4())
        r = await client.post(
            undoable.path, json=undoable.body(ref), headers={"Idempotency-Key": key()}
        )
        assert r.status_code == 201
        undo_key = key()
        undos = await asyncio.gather(
            *(
                client.post(
                    undoable.undo_path,
                    json={"order_ref": ref},
                    headers={"Idempotency-Key": undo_key},
                )
                for _ in range(20)
            )
        )
        assert {u.status_code for u in undos} == {200}
        assert len({u.text for u in undos}) == 1
        after = await counts(client, ref)
        assert after[undoable.counted] == 1
        assert after[undoable.undone] == 1
        if undoable.id == "payments-charge":
            assert after["refunds"] == 1
            assert undos[0].json()["amount"] == 42.5
        # Undoing again (a new key) finds nothing left to undo.
        again = await client.post(
            undoable.undo_path, json={"order_ref": ref}, headers={"Idempotency-Key": key()}
        )
        assert again.status_code == 200
        assert await counts(client, ref) == after


async def test_chaos_makes_it_fail_slow_down_and_recover(case: Case, started: Starter) -> None:
    async with started(case) as client:
        ref = str(uuid.uuid4())

        async def call() -> httpx.Response:
            return await client.post(
                case.path, json=case.body(ref), headers={"Idempotency-Key": key()}
            )

        r = await client.post("/_chaos", json={"fail_status": 503, "retry_after": 2})
        assert r.status_code == 200, r.text
        assert (await client.get("/_chaos")).json()["fail_status"] == 503
        down = await call()
        assert down.status_code == 503
        assert down.headers["retry-after"] == "2"
        assert down.headers["content-type"].startswith("application/problem+json")

        await client.post("/_chaos", json={"fail_status": 429, "retry_after": 1})
        assert (await call()).status_code == 429

        await client.post("/_chaos", json={"fail_status": 400})
        refused = await call()
        assert refused.status_code == 400
        assert "retry-after" not in refused.headers
        assert (await counts(client, ref))[case.counted] == 0, "a refused call changed something"

        await client.post("/_chaos", json={"fail_status": 500, "fail_rate": 0.5})
        statuses = [(await call()).status_code for _ in range(40)]
        assert 500 in statuses and any(200 <= s < 300 for s in statuses), statuses

        await client.post("/_chaos", json={"delay_seconds": 0.4})
        began = time.monotonic()
        slow = await call()
        assert 200 <= slow.status_code < 300
        assert time.monotonic() - began >= 0.4

        bad = await client.post("/_chaos", json={"fail_rate": 2})
        assert bad.status_code == 422

        assert (await client.post("/_chaos", json={})).status_code == 200
        assert 200 <= (await call()).status_code < 300


# --- payments as a callback step's participant --------------------------------------------


@pytest.fixture
async def payments(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        serve(create_payments_app(db_url)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        yield client


@pytest.fixture
async def saga_side() -> AsyncIterator[Recorder]:
    """Stands in for the orchestrator's callback route: records the reports."""
    recorder = Recorder()
    async with serve(recorder.app) as base:
        recorder.url = base
        yield recorder


async def _reports(saga_side: Recorder, token: str, count: int = 1) -> list[Any]:
    deadline = time.monotonic() + 10
    while len(saga_side.to(f"/v1/callbacks/{token}")) < count:
        assert time.monotonic() < deadline, f"no report to {token}"
        await asyncio.sleep(0.02)
    return [c.body for c in saga_side.to(f"/v1/callbacks/{token}")]


async def test_a_charge_with_a_callback_url_is_accepted_then_reported(
    payments: httpx.AsyncClient, saga_side: Recorder
) -> None:
    await payments.post("/_provider", json={"confirm_delay_seconds": 0.1})
    ref, idem = str(uuid.uuid4()), key()
    headers = {"Idempotency-Key": idem, "X-Saga-Callback-URL": f"{saga_side.url}/v1/callbacks/t1"}
    body = {"amount": 42.5, "order_ref": ref}
    accepted = await payments.post("/charges", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "pending"
    (report,) = await _reports(saga_side, "t1")
    charge_id = accepted.json()["id"]
    assert report == {
        "status": "succeeded",
        "response": {"id": charge_id, "order_ref": ref, "amount": 42.5, "status": "captured"},
    }
    assert "authorization" not in saga_side.to("/v1/callbacks/t1")[0].headers

    # A retry after a timeout: the same key, a new URL: the same 202, no second charge,
    # and the outcome (decided once) reported to the new URL.
    headers["X-Saga-Callback-URL"] = f"{saga_side.url}/v1/callbacks/t2"
    again = await payments.post("/charges", json=body, headers=headers)
    assert (again.status_code, again.json()) == (202, accepted.json())
    assert again.headers.get("idempotent-replayed") == "true"
    assert await _reports(saga_side, "t2") == [report]
    assert (await counts(payments, ref))["charges"] == 1
    provider = (await payments.get("/_provider")).json()
    assert provider["reports"] == {"taken": 2}


async def test_a_declined_charge_is_reported_failed_and_its_refund_is_a_no_op(
    payments: httpx.AsyncClient, saga_side: Recorder
) -> None:
    r = await payments.post(
        "/_provider", json={"confirm_delay_seconds": 0, "decline": "insufficient funds"}
    )
    assert r.status_code == 200, r.text
    ref = str(uuid.uuid4())
    headers = {"Idempotency-Key": key(), "X-Saga-Callback-URL": f"{saga_side.url}/v1/callbacks/d"}
    accepted = await payments.post(
        "/charges", json={"amount": 9, "order_ref": ref}, headers=headers
    )
    assert accepted.status_code == 202, accepted.text
    assert await _reports(saga_side, "d") == [
        {"status": "failed", "error": "card declined: insufficient funds"}
    ]
    refund = await payments.post(
        "/refunds", json={"order_ref": ref}, headers={"Idempotency-Key": key()}
    )
    assert refund.status_code == 200 and refund.json()["refunded"] == []
    got = await counts(payments, ref)
    assert (got["charges"], got["charges_declined"], got["refunds"]) == (1, 1, 0)
    assert (await payments.post("/_provider", json={})).json()["decline"] is None


async def test_a_charge_undone_before_its_confirmation_is_voided_and_reported_failed(
    payments: httpx.AsyncClient, saga_side: Recorder
) -> None:
    await payments.post("/_provider", json={"confirm_delay_seconds": 0.5})
    saga_side.always("/v1/callbacks/v", Reply(409, {"status": 409, "detail": "moved on"}))
    ref = str(uuid.uuid4())
    headers = {"Idempotency-Key": key(), "X-Saga-Callback-URL": f"{saga_side.url}/v1/callbacks/v"}
    accepted = await payments.post(
        "/charges", json={"amount": 9, "order_ref": ref}, headers=headers
    )
    assert accepted.status_code == 202, accepted.text
    refund = await payments.post(
        "/refunds", json={"order_ref": ref}, headers={"Idempotency-Key": key()}
    )
    assert refund.status_code == 200, refund.text
    (report,) = await _reports(saga_side, "v")
    assert report["status"] == "failed" and "voided" in report["error"]
    got = await counts(payments, ref)
    assert (got["charges"], got["charges_voided"], got["charges_refunded"]) == (1, 1, 0)
    deadline = time.monotonic() + 5
    while (await payments.get("/_provider")).json()["reports"] != {"refused_409": 1}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
