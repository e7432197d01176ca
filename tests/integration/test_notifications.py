"""Completion notifications: the saga's view POSTed to its target once it is terminal,
with the same key on every delivery, retried, dead-lettered when exhausted, through the
service's breaker and bulkhead; a notification never changes the saga's status."""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg

from app.main import create_app
from app.store.db import make_engine
from app.store.retention import Retention
from tests.conftest import make_settings
from tests.support.api_helpers import assert_problem
from tests.support.engine_helpers import define, events, fast_retry, put_service, query, step
from tests.support.isolation_helpers import ADMIN, eventually, participant_server
from tests.support.servers import Participant, Received, Reply, serve

TERMINAL = ("completed", "compensated", "failed")


def hook(path: str = "/hooks", service: str = "hooks", **extra: Any) -> dict[str, Any]:
    return {"service": service, "path": path, "retry": fast_retry(max_attempts=5), **extra}


async def _start(
    client: httpx.AsyncClient, definition: str, key: str | None = None, **body: Any
) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    r = await client.post("/v1/sagas", json={"definition": definition, **body}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


async def _saga(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sagas/{saga_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def _settled(client: httpx.AsyncClient, saga_id: str, within: float = 30) -> dict[str, Any]:
    """The saga once it is terminal and its notification is no longer pending."""

    async def check() -> dict[str, Any] | None:
        saga = await _saga(client, saga_id)
        note = saga["notification"]
        if saga["status"] in TERMINAL and note and note["status"] != "pending":
            return saga
        return None

    found: dict[str, Any] = await eventually(check, within=within, what="a settled notification")
    return found


def _for(receiver: Participant, saga_id: str, path: str = "/hooks") -> list[Received]:
    return [c for c in receiver.to(path) if c.headers.get("x-saga-id") == saga_id]


def _without_notification(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "notification"}


async def _setup(
    client: httpx.AsyncClient, participant: Participant, receiver: Participant, **hooks: Any
) -> None:
    await put_service(client, participant.url)
    await put_service(client, receiver.url, name="hooks", headers={"X-Hook-Key": "s3"}, **hooks)


async def test_delivered_once_on_completion_and_on_compensation(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        note = hook(headers={"X-Tenant": "acme"})
        await define(orchestrator, "ok", [step("a"), step("b")], notify=note)
        await define(orchestrator, "unwinds", [step("a"), step("bad")], notify=note)
        participant.always("/bad", Reply(400))
        done = await _start(orchestrator, "ok", input={"n": 1})
        assert done["notification"] == {"status": "pending", "attempts": 0}
        undone = await _start(orchestrator, "unwinds")

        for saga_id, status in ((done["id"], "completed"), (undone["id"], "compensated")):
            saga = await _settled(orchestrator, saga_id)
            assert saga["status"] == status, saga
            assert saga["notification"] == {"status": "delivered", "attempts": 1}
            (delivery,) = _for(receiver, saga_id)
            assert delivery.method == "POST"
            assert delivery.headers["idempotency-key"] == f"{saga_id}:notify"
            assert delivery.headers["x-saga-status"] == status
            assert delivery.headers["content-type"] == "application/json"
            assert delivery.headers["x-tenant"] == "acme"
            assert delivery.headers["x-hook-key"] == "s3"  # the service's headers too
            # The body is the saga's view; only its notification moved since.
            assert _without_notification(delivery.body) == _without_notification(saga)
            assert delivery.body["notification"] == {"status": "pending", "attempts": 1}
            types = [e["type"] for e in await events(orchestrator, saga_id)]
            assert types[-1] == "notification_delivered", types
            assert types.count(f"saga_{status}") == 1
        # A saga without a target shows none.
        await define(orchestrator, "quiet", [step("a")])
        quiet = await _start(orchestrator, "quiet")
        assert quiet["notification"] is None
        r = await orchestrator.get(f"/v1/sagas/{quiet['id']}", params={"wait_seconds": 10})
        assert r.json()["status"] == "completed" and r.json()["notification"] is None


async def test_a_start_overrides_the_definition_and_binds_its_key(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        await define(orchestrator, "flow", [step("a")], notify=hook("/default"))
        own = {"url": f"{receiver.url}/override", "retry": fast_retry()}
        saga = await _start(orchestrator, "flow", key="k-1", notify=own)
        await _settled(orchestrator, saga["id"])
        assert len(_for(receiver, saga["id"], "/override")) == 1
        assert _for(receiver, saga["id"], "/default") == []
        default = await _start(orchestrator, "flow")
        await _settled(orchestrator, default["id"])
        assert len(_for(receiver, default["id"], "/default")) == 1

        # The same key: the same notify replays, another one is refused.
        r = await orchestrator.post(
            "/v1/sagas",
            json={"definition": "flow", "notify": own},
            headers={"Idempotency-Key": "k-1"},
        )
        assert r.status_code == 200 and r.json()["id"] == saga["id"], r.text
        other = {**own, "url": f"{receiver.url}/elsewhere"}
        r = await orchestrator.post(
            "/v1/sagas",
            json={"definition": "flow", "notify": other},
            headers={"Idempotency-Key": "k-1"},
        )
        assert_problem(r, 422)
        r = await orchestrator.post(
            "/v1/sagas", json={"definition": "flow"}, headers={"Idempotency-Key": "k-1"}
        )
        assert_problem(r, 422)


async def test_invalid_targets_are_refused(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "flow", [step("a")])
    r = await orchestrator.post(
        "/v1/sagas", json={"definition": "flow", "notify": {"service": "nope", "path": "/h"}}
    )
    problem = assert_problem(r, 422)
    assert problem["type"].endswith("invalid-notify") and "nope" in problem["detail"], problem
    for bad in (
        {"url": "http://127.0.0.1/${saga.id}"},
        {"service": "svc", "path": "/h", "url": "http://127.0.0.1/"},
        {"service": "svc", "path": "/h", "headers": {"X-Saga-Status": "x"}},
        {"service": "svc", "path": "/h", "headers": {"X-Token": "${input.t}"}},
        {"service": "svc", "path": "/h", "retry": {"max_attempts": 0}},
    ):
        r = await orchestrator.post("/v1/sagas", json={"definition": "flow", "notify": bad})
        assert_problem(r, 422)
    doc = {"name": "d", "steps": [step("a")], "notify": {"service": "nope", "path": "/h"}}
    problem = assert_problem(await orchestrator.post("/v1/definitions", json=doc), 422)
    assert ["body", "notify", "service"] in [e["loc"] for e in problem["errors"]], problem


async def test_a_definition_without_notify_keeps_its_hash(orchestrator: httpx.AsyncClient) -> None:
    r = await orchestrator.put("/v1/services/svc", json={"base_url": "http://127.0.0.1:9"})
    assert r.status_code == 201
    first = await define(orchestrator, "same", [step("a")])
    again = await define(orchestrator, "same", [step("a")], notify=None)
    assert again["version"] == first["version"]
    assert again["content_hash"] == first["content_hash"]


async def test_retried_with_backoff_then_delivered_retry_after_honoured(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        retry = fast_retry(max_attempts=5)
        await define(orchestrator, "flow", [step("a")], notify=hook(retry=retry))
        receiver.script("/hooks", Reply(500), Reply(503, headers={"Retry-After": "1"}), Reply(200))
        saga = await _start(orchestrator, "flow")
        settled = await _settled(orchestrator, saga["id"])
        assert settled["status"] == "completed"
        assert settled["notification"] == {"status": "delivered", "attempts": 3}
        calls = _for(receiver, saga["id"])
        assert len(calls) == 3
        assert {c.headers["idempotency-key"] for c in calls} == {f"{saga['id']}:notify"}
        # Retry-After (1 s) replaced the policy's 0.05 s, capped by max_interval (0.2 s).
        assert calls[2].at - calls[1].at < 1.0
        assert calls[2].at - calls[1].at >= 0.15


async def test_retry_after_is_honoured_up_to_max_interval(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        retry = fast_retry(max_attempts=3, max_interval_seconds=5)
        await define(orchestrator, "flow", [step("a")], notify=hook(retry=retry))
        receiver.script("/hooks", Reply(429, headers={"Retry-After": "1"}), Reply(204))
        saga = await _start(orchestrator, "flow")
        settled = await _settled(orchestrator, saga["id"])
        assert settled["notification"] == {"status": "delivered", "attempts": 2}
        first, second = _for(receiver, saga["id"])
        assert second.at - first.at >= 0.95


async def test_exhausted_to_a_dead_letter_then_retried_and_discarded(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        await define(
            orchestrator, "flow", [step("a")], notify=hook(retry=fast_retry(max_attempts=2))
        )
        receiver.always("/hooks", Reply(500))
        saga = await _start(orchestrator, "flow")
        settled = await _settled(orchestrator, saga["id"])
        assert settled["status"] == "completed", "a notification never changes the status"
        assert settled["notification"] == {"status": "failed", "attempts": 2}
        assert len(_for(receiver, saga["id"])) == 2
        types = [e["type"] for e in await events(orchestrator, saga["id"])]
        assert types[-1] == "notification_failed"
        r = await orchestrator.get(
            "/v1/admin/dead-letters", params={"status": "open"}, headers=ADMIN
        )
        (letter,) = [d for d in r.json()["items"] if d["saga_id"] == saga["id"]]
        assert letter["direction"] == "notify" and letter["step"] is None
        assert letter["service"] == "hooks" and letter["attempts"] == 2
        assert letter["last_error"]["status_code"] == 500
        assert letter["request"]["headers"]["X-Hook-Key"] == "[redacted]"
        assert letter["request"]["headers"]["Idempotency-Key"] == f"{saga['id']}:notify"

        # Fixed: the operator's retry delivers it, with the same key.
        receiver.always("/hooks", Reply(200))
        r = await orchestrator.post(f"/v1/admin/dead-letters/{letter['id']}/retry", headers=ADMIN)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "retried"
        settled = await _settled(orchestrator, saga["id"])
        assert settled["notification"] == {"status": "delivered", "attempts": 1}
        assert settled["status"] == "completed"
        calls = _for(receiver, saga["id"])
        assert len(calls) == 3 and calls[-1].headers["idempotency-key"] == f"{saga['id']}:notify"
        again = await orchestrator.post(
            f"/v1/admin/dead-letters/{letter['id']}/retry", headers=ADMIN
        )
        assert again.status_code == 200  # already retried: idempotent

        # Another one is discarded: it stays failed, its letter closed with the reason.
        receiver.always("/hooks", Reply(500))
        other = await _start(orchestrator, "flow")
        await _settled(orchestrator, other["id"])
        r = await orchestrator.get(
            "/v1/admin/dead-letters", params={"status": "open"}, headers=ADMIN
        )
        (letter,) = [d for d in r.json()["items"] if d["saga_id"] == other["id"]]
        r = await orchestrator.post(
            f"/v1/admin/dead-letters/{letter['id']}/discard",
            json={"reason": "told them by mail"},
            headers=ADMIN,
        )
        assert r.status_code == 202 and r.json()["status"] == "discarded", r.text
        assert (await _saga(orchestrator, other["id"]))["notification"]["status"] == "failed"
        r = await orchestrator.get("/v1/admin/audit", headers=ADMIN)
        actions = [a["action"] for a in r.json()["items"]]
        assert "dead_letter.retry" in actions and "dead_letter.discard" in actions


async def test_an_open_breaker_holds_notifications_back_without_spending_attempts(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        recovery = 2.0
        breaker = {"failure_threshold": 1, "recovery_timeout_seconds": recovery}
        await _setup(orchestrator, participant, receiver, circuit_breaker=breaker)
        await define(
            orchestrator, "flow", [step("a")], notify=hook(retry=fast_retry(max_attempts=1))
        )
        receiver.script("/hooks", Reply(503))
        first = await _start(orchestrator, "flow")
        assert (await _settled(orchestrator, first["id"]))["notification"]["status"] == "failed"
        r = await orchestrator.get("/v1/services/hooks")
        assert r.json()["circuit_state"] == "open", "the failed delivery counted"
        opened = time.monotonic()

        second = await _start(orchestrator, "flow")
        r = await orchestrator.get(f"/v1/sagas/{second['id']}", params={"wait_seconds": 10})
        assert r.json()["status"] == "completed"
        if time.monotonic() - opened < recovery - 0.5:
            saga = await _saga(orchestrator, second["id"])
            assert saga["notification"] == {"status": "pending", "attempts": 0}
            assert _for(receiver, second["id"]) == []
        # Once it may probe, the probe delivers and closes the breaker.
        settled = await _settled(orchestrator, second["id"])
        assert settled["notification"] == {"status": "delivered", "attempts": 1}
        (call,) = _for(receiver, second["id"])
        assert call.at - opened >= recovery - 0.3
        r = await orchestrator.get("/v1/services/hooks")
        assert r.json()["circuit_state"] == "closed"


async def test_the_bulkhead_holds_deliveries_to_its_concurrency(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver, max_concurrency=1)
        await define(orchestrator, "flow", [step("a")], notify=hook())
        receiver.always("/hooks", Reply(200, delay=0.3))
        ids = [(await _start(orchestrator, "flow"))["id"] for _ in range(4)]
        for saga_id in ids:
            settled = await _settled(orchestrator, saga_id)
            assert settled["notification"]["status"] == "delivered"
            assert len(_for(receiver, saga_id)) == 1
        assert receiver.max_in_flight == 1


async def test_a_saga_that_ends_again_is_notified_again_with_the_same_key(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        steps = [step("a", pivot=True), step("b", compensate=False)]
        await define(orchestrator, "pivoted", steps, notify=hook())
        participant.script("/b", Reply(400))
        saga = await _start(orchestrator, "pivoted")
        failed = await _settled(orchestrator, saga["id"])
        assert failed["status"] == "failed"
        assert failed["notification"] == {"status": "delivered", "attempts": 1}
        r = await orchestrator.get(
            "/v1/admin/dead-letters", params={"status": "open"}, headers=ADMIN
        )
        (letter,) = [d for d in r.json()["items"] if d["saga_id"] == saga["id"]]
        assert letter["direction"] == "action" and letter["step"] == "b"

        r = await orchestrator.post(f"/v1/admin/dead-letters/{letter['id']}/retry", headers=ADMIN)
        assert r.status_code == 202, r.text

        async def twice() -> list[Received] | None:
            calls = _for(receiver, saga["id"])
            return calls if len(calls) == 2 else None

        first, second = await eventually(twice, within=30, what="a second delivery")
        assert first.headers["x-saga-status"] == "failed"
        assert second.headers["x-saga-status"] == "completed"
        assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
        settled = await _settled(orchestrator, saga["id"])
        assert settled["status"] == "completed"
        assert settled["notification"] == {"status": "delivered", "attempts": 1}
        assert second.body["status"] == "completed"


async def test_retention_keeps_a_saga_whose_notification_is_pending(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    async with participant_server() as receiver:
        await _setup(orchestrator, participant, receiver)
        slow = fast_retry(max_attempts=50, initial_interval_seconds=30, max_interval_seconds=60)
        await define(orchestrator, "told", [step("a")], notify=hook())
        await define(orchestrator, "waits", [step("a")], notify=hook("/down", retry=slow))
        receiver.always("/down", Reply(503))
        told = await _start(orchestrator, "told")
        waits = await _start(orchestrator, "waits")
        assert (await _settled(orchestrator, told["id"]))["notification"]["status"] == "delivered"

        async def attempted() -> bool:
            note = (await _saga(orchestrator, waits["id"]))["notification"]
            return bool(note["attempts"] >= 1)

        await eventually(attempted, what="a first failed delivery")
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("UPDATE sagas SET finished_at = now() - interval '1000 hours'")
        engine = make_engine(db_url)
        try:
            pruned = await Retention(engine).prune(3600)
        finally:
            await engine.dispose()
        assert pruned is not None and pruned.sagas == 1
        assert (await orchestrator.get(f"/v1/sagas/{told['id']}")).status_code == 404
        kept = await _saga(orchestrator, waits["id"])
        assert kept["notification"]["status"] == "pending"
        rows = await query(db_url, "SELECT saga_id FROM notifications")
        assert [str(r["saga_id"]) for r in rows] == [waits["id"]]


async def test_a_saga_parked_by_the_crash_limit_is_notified(
    db_url: str, participant: Participant
) -> None:
    """An engine error that repeats parks the saga `failed` (without a terminal commit of
    the driver's): the park arms the notification too, for any executor."""
    settings = make_settings(SAGA_FAILPOINT="raise:after_send_before_commit", SAGA_LEASE_SECONDS=1)
    app = create_app(settings, db_url, run_executor=True)
    async with (
        participant_server() as receiver,
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=40) as client,
    ):
        await _setup(client, participant, receiver)
        await define(
            client,
            "buggy",
            [step("a", retry=fast_retry(10), compensate=False)],
            notify=hook(),
        )
        saga = await _start(client, "buggy")
        settled = await _settled(client, saga["id"], within=40)
        assert settled["status"] == "failed"
        assert "parked for an operator" in settled["error"]["message"]
        assert settled["notification"] == {"status": "delivered", "attempts": 1}
        (delivery,) = _for(receiver, saga["id"])
        assert delivery.headers["x-saga-status"] == "failed"
