"""Starting sagas idempotently: one key, one saga, one charge — however many callers."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import wait_terminal
from tests.support.engine_helpers import define, put_service, query, start, step
from tests.support.servers import Participant


async def _charge_definition(client: httpx.AsyncClient, participant: Participant) -> None:
    await put_service(client, participant.url)
    await define(
        client, "charge", [step("charge", body={"amount": "${input.amount}"}, compensate=False)]
    )


async def _count(db_url: str, sql: str, **params: object) -> int:
    rows = await query(db_url, sql, params)
    return int(rows[0]["n"])


async def test_concurrent_starts_with_one_key_create_one_saga(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await _charge_definition(orchestrator, participant)
    body = {"definition": "charge", "input": {"amount": 100, "currency": "EUR"}}
    key = "order-4711"

    async def post() -> httpx.Response:
        return await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": key})

    responses = await asyncio.gather(*(post() for _ in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [201], [(r.status_code, r.text) for r in responses]
    (created,) = [r for r in responses if r.status_code == 201]
    assert "Idempotent-Replayed" not in created.headers
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    (saga_id,) = ids
    assert created.headers["Location"] == f"/v1/sagas/{saga_id}"
    for r in responses:
        if r.status_code == 200:
            assert r.headers.get("Idempotent-Replayed") == "true"
        assert r.json()["idempotency_key"] == key
        assert r.json()["input"] == body["input"]

    assert await _count(db_url, "SELECT count(*) AS n FROM sagas") == 1
    assert (
        await _count(db_url, "SELECT count(*) AS n FROM idempotency_keys WHERE key = %(k)s", k=key)
        == 1
    )

    saga = await wait_terminal(orchestrator, saga_id)
    assert saga["status"] == "completed", saga
    charges = participant.to("/charge")
    assert len({c.headers["idempotency-key"] for c in charges}) == 1
    assert len(charges) == 1
    assert charges[0].headers["idempotency-key"] == f"{saga_id}:charge:action"
    assert charges[0].body == {"amount": 100}


async def test_same_key_with_different_input_or_definition_is_422(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await _charge_definition(orchestrator, participant)
    await define(orchestrator, "other", [step("other", compensate=False)])
    first = await start(orchestrator, "charge", {"amount": 1}, key="k-1")

    r = await orchestrator.post(
        "/v1/sagas",
        json={"definition": "charge", "input": {"amount": 2}},
        headers={"Idempotency-Key": "k-1"},
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 422

    r = await orchestrator.post(
        "/v1/sagas",
        json={"definition": "other", "input": {"amount": 1}},
        headers={"Idempotency-Key": "k-1"},
    )
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")

    assert await _count(db_url, "SELECT count(*) AS n FROM sagas") == 1
    saga = await wait_terminal(orchestrator, first["id"])
    assert saga["input"] == {"amount": 1}
    assert [c.body for c in participant.to("/charge")] == [{"amount": 1}]
    assert participant.to("/other") == []


async def test_without_a_key_each_post_is_a_new_saga(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await _charge_definition(orchestrator, participant)
    one = await start(orchestrator, "charge", {"amount": 5})
    two = await start(orchestrator, "charge", {"amount": 5})
    assert one["id"] != two["id"]
    assert one["idempotency_key"] is None
    assert await _count(db_url, "SELECT count(*) AS n FROM sagas") == 2
    for saga_id in (one["id"], two["id"]):
        assert (await wait_terminal(orchestrator, saga_id))["status"] == "completed"
    charge_keys = {c.headers["idempotency-key"] for c in participant.to("/charge")}
    assert charge_keys == {f"{one['id']}:charge:action", f"{two['id']}:charge:action"}


async def test_replay_returns_the_saga_as_it_is_now(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _charge_definition(orchestrator, participant)
    body = {"definition": "charge", "input": {"amount": 7}}
    first = await start(orchestrator, "charge", body["input"], key="replay-me")
    done = await wait_terminal(orchestrator, first["id"])
    assert done["status"] == "completed"

    r = await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": "replay-me"})
    assert r.status_code == 200, r.text
    assert r.headers.get("Idempotent-Replayed") == "true"
    assert r.headers["Location"] == f"/v1/sagas/{first['id']}"
    replay = r.json()
    assert replay["id"] == first["id"]
    assert replay["status"] == "completed"
    assert replay["finished_at"] == done["finished_at"]
    assert replay["steps"][0]["status"] == "succeeded"
    assert replay["steps"][0]["response"] == done["steps"][0]["response"]
    assert len(participant.to("/charge")) == 1


async def test_bad_idempotency_key_is_422(orchestrator: httpx.AsyncClient) -> None:
    r = await orchestrator.post(
        "/v1/sagas",
        json={"definition": "nope", "input": {}},
        headers={"Idempotency-Key": "x" * 256},
    )
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
