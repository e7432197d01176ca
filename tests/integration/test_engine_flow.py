"""The engine's happy path: templating, chaining, what participants receive, history,
listing and long-polling."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import httpx

from tests.conftest import wait_terminal
from tests.support.engine_helpers import (
    define,
    events,
    fast_retry,
    paths,
    put_service,
    run,
    start,
    step,
    step_of,
)
from tests.support.servers import Participant, Reply

INPUT = {
    "amount": 42,
    "price": 9.5,
    "currency": "EUR",
    "items": [{"sku": "a-1", "qty": 2}],
    "express": True,
    "customer": {"name": "Ann", "tags": ["vip"]},
    "nothing": None,
}


async def _checkout(client: httpx.AsyncClient, participant: Participant, **extra: object) -> None:
    await put_service(client, participant.url, headers={"X-Api-Key": "k-123"})
    await define(
        client,
        "checkout",
        [
            step(
                "charge",
                body={
                    "amount": "${input.amount}",
                    "price": "${input.price}",
                    "items": "${input.items}",
                    "express": "${input.express}",
                    "customer": "${input.customer}",
                    "first_tag": "${input.customer.tags.0}",
                    "nothing": "${input.nothing}",
                    "ref": "order-${saga.id}",
                    "label": "${input.amount} ${input.currency} for ${input.customer.name}",
                    "literal": 7,
                },
            ),
            step(
                "order",
                method="PUT",
                body={
                    "charge_id": "${steps.charge.response.id}",
                    "charge_status": "${steps.charge.status_code}",
                    "total": "${steps.charge.response.total}",
                    "summary": "charge ${steps.charge.response.id} got ${steps.charge.status_code}",
                },
            ),
            step("notify", compensate=False, body={"order": "${steps.order.response.id}"}),
        ],
        **extra,
    )
    # The participant answers /charge with its own document and 201.
    participant.script("/charge", Reply(201, {"id": "ch_1", "total": 42.5}))


async def test_happy_path_templating_chaining_and_headers(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await _checkout(orchestrator, participant, timeout_seconds=120)
    created = await start(orchestrator, "checkout", INPUT, headers={"X-Request-ID": "req-flow-1"})
    saga_id = created["id"]
    assert created["status"] in ("running", "completed")
    saga = await wait_terminal(orchestrator, saga_id, seconds=60)

    assert saga["status"] == "completed", saga
    assert saga["error"] is None
    assert saga["finished_at"] is not None
    assert [s["status"] for s in saga["steps"]] == ["succeeded"] * 3
    for s in saga["steps"]:
        assert s["attempts"] == 1
        assert s["compensation_attempts"] == 0
        assert s["started_at"] is not None and s["finished_at"] is not None
        assert s["last_error"] is None

    # Exactly the three actions, in order, no compensation.
    assert paths(participant.calls) == ["/charge", "/order", "/notify"]

    (charge,) = participant.to("/charge")
    assert charge.method == "POST"
    assert charge.body == {
        "amount": 42,
        "price": 9.5,
        "items": [{"sku": "a-1", "qty": 2}],
        "express": True,
        "customer": {"name": "Ann", "tags": ["vip"]},
        "first_tag": "vip",
        "nothing": None,
        "ref": f"order-{saga_id}",
        "label": "42 EUR for Ann",
        "literal": 7,
    }

    (order,) = participant.to("/order")
    assert order.method == "PUT"
    assert order.body == {
        "charge_id": "ch_1",
        "charge_status": 201,
        "total": 42.5,
        "summary": "charge ch_1 got 201",
    }
    (notify,) = participant.to("/notify")
    assert notify.body == {"order": f"/order-{saga_id}:order:action"}

    # Responses and status codes are stored on the steps.
    assert step_of(saga, "charge")["response"] == {"id": "ch_1", "total": 42.5}
    assert step_of(saga, "charge")["status_code"] == 201
    assert step_of(saga, "order")["status_code"] == 200
    assert step_of(saga, "order")["response"] == {
        "id": f"/order-{saga_id}:order:action",
        "echo": order.body,
    }

    # What every participant call carries.
    deadline = datetime.fromisoformat(saga["deadline_at"])
    created_at = datetime.fromisoformat(saga["created_at"])
    assert abs((deadline - created_at) - timedelta(seconds=120)) < timedelta(seconds=2)
    for call, name in zip(participant.calls, ["charge", "order", "notify"], strict=True):
        h = call.headers
        assert h["idempotency-key"] == f"{saga_id}:{name}:action"
        assert h["x-saga-id"] == saga_id
        assert h["x-saga-step"] == name
        assert h["x-saga-attempt"] == "1"
        assert h["x-request-id"] == "req-flow-1"
        assert h["content-type"].startswith("application/json")
        assert h["x-api-key"] == "k-123"
        sent_deadline = datetime.fromisoformat(h["x-saga-deadline"].replace("Z", "+00:00"))
        assert sent_deadline.tzinfo is not None
        assert abs(sent_deadline - deadline) < timedelta(seconds=1)


async def test_no_deadline_header_without_definition_timeout(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "plain",
        [
            step("a", compensate=False, body={"x": "${input.x}"}),
            # An absolute URL and definition-level headers (templated) work too.
            {
                "name": "b",
                "action": {
                    "url": participant.url + "/direct",
                    "headers": {"X-Tenant": "t-${input.x}"},
                    "body": {"a": "${steps.a.response.id}"},
                },
            },
        ],
    )
    saga = await run(orchestrator, "plain", {"x": 5})
    assert saga["status"] == "completed", saga
    assert saga["deadline_at"] is None
    a_call, b_call = participant.calls
    for call in (a_call, b_call):
        assert "x-saga-deadline" not in call.headers
        # Without a caller's X-Request-ID there is still one.
        assert call.headers.get("x-request-id")
    assert b_call.path == "/direct"
    assert b_call.headers["x-tenant"] == "t-5"
    assert b_call.headers["idempotency-key"] == f"{saga['id']}:b:action"
    assert b_call.body == {"a": f"/a-{saga['id']}:a:action"}


async def test_paths_methods_and_compensation_paths_are_templated(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "paths",
        [
            {
                "name": "lookup",
                "action": {
                    "service": "svc",
                    "method": "get",
                    "path": "/accounts/${input.account}?currency=${input.currency}",
                },
            },
            {
                "name": "hold",
                "action": {
                    "service": "svc",
                    "path": "/holds",
                    "body": {"account": "${steps.lookup.response.id}"},
                },
                "compensation": {
                    "service": "svc",
                    "method": "DELETE",
                    "path": "/holds/${steps.hold.response.hold_id}",
                },
            },
            {"name": "boom", "action": {"service": "svc", "path": "/boom"}},
        ],
    )
    participant.script("/accounts/acc-9", Reply(200, {"id": "acc-9"}))
    participant.script("/holds", Reply(201, {"hold_id": "h-77"}))
    participant.always("/boom", Reply(400))
    saga = await run(orchestrator, "paths", {"account": "acc-9", "currency": "EUR"})
    assert saga["status"] == "compensated", saga
    lookup, hold, boom, release = participant.calls
    assert (lookup.method, lookup.path) == ("GET", "/accounts/acc-9")
    assert (hold.method, hold.path, hold.body) == ("POST", "/holds", {"account": "acc-9"})
    assert (boom.method, boom.path) == ("POST", "/boom")
    assert (release.method, release.path) == ("DELETE", "/holds/h-77")
    assert release.headers["idempotency-key"] == f"{saga['id']}:hold:compensation"


async def test_events_record_every_attempt(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "hist",
        [
            step("a", retry=fast_retry(3)),
            step("b"),
        ],
    )
    participant.script("/a", Reply(503))
    saga = await run(orchestrator, "hist", {})
    assert saga["status"] == "completed", saga
    assert step_of(saga, "a")["attempts"] == 2

    items = await events(orchestrator, saga["id"])
    types = [e["type"] for e in items]
    assert types[0] == "saga_started"
    assert types[-1] == "saga_completed"
    assert [e["id"] for e in items] == sorted(e["id"] for e in items)

    attempts = [e for e in items if e["type"] in ("attempt_started", "attempt_finished")]
    assert [(e["type"], e["step"], e["attempt"]) for e in attempts] == [
        ("attempt_started", "a", 1),
        ("attempt_finished", "a", 1),
        ("attempt_started", "a", 2),
        ("attempt_finished", "a", 2),
        ("attempt_started", "b", 1),
        ("attempt_finished", "b", 1),
    ]
    finished = [e for e in attempts if e["type"] == "attempt_finished"]
    assert [e["outcome"] for e in finished] == ["retryable", "succeeded", "succeeded"]
    assert [e["status_code"] for e in finished] == [503, 200, 200]
    assert finished[0]["error_kind"] == "http_status"
    for e in finished:
        assert e["direction"] == "action"
        assert e["duration_ms"] is not None and e["duration_ms"] >= 0
        assert e["at"]
    for e in attempts:
        if e["type"] == "attempt_started":
            assert e["outcome"] == "started"
    assert all(e["worker"] for e in attempts)

    r = await orchestrator.get(f"/v1/sagas/{saga['id']}/events", params={"limit": 2})
    assert r.status_code == 200
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    r = await orchestrator.get(
        f"/v1/sagas/{saga['id']}/events", params={"limit": 500, "cursor": page["next_cursor"]}
    )
    assert [e["id"] for e in r.json()["items"]] == [e["id"] for e in items[2:]]


async def test_list_filters_and_paginates(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "alpha", [step("a")])
    await define(orchestrator, "beta", [step("a"), step("b2", path="/beta-fail")])
    participant.always("/beta-fail", Reply(400))

    alpha_ids = []
    for i in range(3):
        alpha_ids.append((await start(orchestrator, "alpha", {"i": i}))["id"])
    beta_ids = [(await start(orchestrator, "beta", {"i": i}))["id"] for i in range(2)]
    for saga_id in alpha_ids + beta_ids:
        await wait_terminal(orchestrator, saga_id, seconds=60)

    async def page(**params: object) -> dict:
        r = await orchestrator.get("/v1/sagas", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    everything = await page(limit=500)
    assert {s["id"] for s in everything["items"]} == set(alpha_ids + beta_ids)
    assert everything["next_cursor"] is None
    created = [s["created_at"] for s in everything["items"]]
    assert [datetime.fromisoformat(c) for c in created] == sorted(
        (datetime.fromisoformat(c) for c in created), reverse=True
    )

    first = await page(definition="alpha", limit=2)
    assert len(first["items"]) == 2
    assert first["next_cursor"]
    second = await page(definition="alpha", limit=2, cursor=first["next_cursor"])
    assert len(second["items"]) == 1
    assert second["next_cursor"] is None
    walked = [s["id"] for s in first["items"] + second["items"]]
    assert walked == list(reversed(alpha_ids))  # newest first, no duplicates
    assert all(s["definition"] == "alpha" for s in first["items"] + second["items"])

    done = await page(status="completed")
    assert {s["id"] for s in done["items"]} == set(alpha_ids)
    undone = await page(status="compensated")
    assert {s["id"] for s in undone["items"]} == set(beta_ids)
    assert all(s["status"] == "compensated" for s in undone["items"])
    assert (await page(status="completed", definition="beta"))["items"] == []
    assert len((await page(status="compensated", definition="beta"))["items"]) == 2

    r = await orchestrator.get("/v1/sagas", params={"status": "bogus"})
    assert r.status_code == 422
    r = await orchestrator.get("/v1/sagas", params={"cursor": "!!not-a-cursor!!"})
    assert r.status_code == 400


async def test_long_poll_returns_when_terminal(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "slow", [step("slow", compensate=False)])
    participant.always("/slow", Reply(delay=1.0))
    saga = await start(orchestrator, "slow", {})

    began = time.monotonic()
    r = await orchestrator.get(f"/v1/sagas/{saga['id']}", params={"wait_seconds": 10})
    elapsed = time.monotonic() - began
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "completed"
    assert elapsed < 8, elapsed
    assert elapsed >= 0.5, elapsed  # it did wait for the 1 s call
    assert len(participant.to("/slow")) == 1

    # Long-polling a terminal saga answers at once.
    began = time.monotonic()
    r = await orchestrator.get(f"/v1/sagas/{saga['id']}", params={"wait_seconds": 10})
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert time.monotonic() - began < 5


async def test_long_poll_times_out_on_a_running_saga(
    api: httpx.AsyncClient, participant: Participant
) -> None:
    """Without an executor the saga stays running: the long-poll answers after wait_seconds."""
    await put_service(api, participant.url)
    await define(api, "idle", [step("a")])
    saga = await start(api, "idle", {})
    began = time.monotonic()
    r = await api.get(f"/v1/sagas/{saga['id']}", params={"wait_seconds": 1})
    assert r.status_code == 200
    assert r.json()["status"] == "running"
    assert time.monotonic() - began >= 0.9
    r = await api.get(f"/v1/sagas/{saga['id']}", params={"wait_seconds": 31})
    assert r.status_code == 422
    r = await api.get("/v1/sagas/00000000-0000-4000-8000-000000000000", params={"wait_seconds": 1})
    assert r.status_code == 404


async def test_pagination_over_concurrently_started_sagas(
    api: httpx.AsyncClient, participant: Participant
) -> None:
    """Sagas created at (nearly) the same instant are each listed exactly once."""
    await put_service(api, participant.url)
    await define(api, "burst", [step("a")])
    created = await asyncio.gather(*(start(api, "burst", {"i": i}) for i in range(23)))
    expected = {s["id"] for s in created}
    seen: list[str] = []
    cursor = None
    for _ in range(20):
        params: dict[str, object] = {"limit": 4, "definition": "burst", "status": "running"}
        if cursor:
            params["cursor"] = cursor
        r = await api.get("/v1/sagas", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 4
        seen.extend(s["id"] for s in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == expected
