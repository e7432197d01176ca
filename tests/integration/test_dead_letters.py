"""Dead letters: what lands there, listing, retry, discard, auth and the audit log."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from app.api.auth import Tokens
from app.main import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.isolation_helpers import (
    ADMIN,
    admin_actions,
    breaker,
    call,
    dead_letters,
    define,
    eventually,
    fast_retry,
    finish,
    put_service,
    saga,
    start,
)
from tests.support.servers import Participant, Reply, serve

ACTOR = Tokens.token_id(ADMIN_TOKEN)


async def _run(client: httpx.AsyncClient, definition: str, i: int = 0) -> dict[str, Any]:
    return await finish(client, (await start(client, definition, {"i": i}))["id"])


def _calls_for(p: Participant, path: str, saga_id: str) -> list[Any]:
    return [c for c in p.to(path) if c.headers.get("x-saga-id") == saga_id]


async def _retry(client: httpx.AsyncClient, dl_id: str) -> httpx.Response:
    return await client.post(f"/v1/admin/dead-letters/{dl_id}/retry", headers=ADMIN)


async def _discard(client: httpx.AsyncClient, dl_id: str, body: Any) -> httpx.Response:
    return await client.post(f"/v1/admin/dead-letters/{dl_id}/discard", json=body, headers=ADMIN)


def _compensating_flow(name: str, service: str) -> list[dict[str, Any]]:
    """`a` succeeds; `b` fails for good (400); `a`'s compensation is the part that breaks."""
    return [
        {
            "name": "a",
            "action": call(service, "/a"),
            "compensation": call(service, "/a/undo", {"saga": "${saga.id}"}),
            "compensation_retry": fast_retry(max_attempts=2),
        },
        {"name": "b", "action": call(service, "/b"), "retry": fast_retry(max_attempts=3)},
    ]


async def test_failed_compensation_is_dead_lettered_listed_retried_and_discarded(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/b", Reply(400, {"error": "rejected"}))
    participant.always("/a/undo", Reply(500, {"error": "down"}))
    await put_service(orchestrator, "svc", participant.url, circuit_breaker=breaker())
    await put_service(orchestrator, "svc2", participant.url, circuit_breaker=breaker())
    await define(orchestrator, "dlc", _compensating_flow("dlc", "svc"))
    await define(orchestrator, "dlx", _compensating_flow("dlx", "svc2"))

    first = await _run(orchestrator, "dlc")
    assert first["status"] == "failed", first
    a, b = first["steps"]
    assert a["status"] == "compensation_failed" and a["compensation_attempts"] == 2, a
    assert b["status"] == "failed", b
    assert len(_calls_for(participant, "/a/undo", first["id"])) == 2

    page = await dead_letters(orchestrator, status="open")
    assert len(page["items"]) == 1, page
    dl1 = page["items"][0]
    assert dl1["saga_id"] == first["id"]
    assert dl1["definition"] == "dlc" and dl1["step"] == "a", dl1
    assert dl1["direction"] == "compensation" and dl1["service"] == "svc", dl1
    assert dl1["status"] == "open" and dl1["attempts"] == 2, dl1
    assert dl1["resolved_at"] is None and dl1["resolved_by"] is None
    r = await orchestrator.get(f"/v1/admin/dead-letters/{dl1['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["id"] == dl1["id"], r.text

    # Three more failed sagas: filters and pagination.
    second = await _run(orchestrator, "dlc", 2)
    third = await _run(orchestrator, "dlc", 3)
    other = await _run(orchestrator, "dlx", 4)
    assert {second["status"], third["status"], other["status"]} == {"failed"}
    by_saga = {d["saga_id"]: d for d in (await dead_letters(orchestrator, status="open"))["items"]}
    assert set(by_saga) == {first["id"], second["id"], third["id"], other["id"]}
    dl2, dl3, dl4 = by_saga[second["id"]], by_saga[third["id"]], by_saga[other["id"]]

    def ids(page: dict[str, Any]) -> set[str]:
        return {d["id"] for d in page["items"]}

    assert ids(await dead_letters(orchestrator, definition="dlc")) == {
        dl1["id"],
        dl2["id"],
        dl3["id"],
    }
    assert ids(await dead_letters(orchestrator, definition="dlx")) == {dl4["id"]}
    assert ids(await dead_letters(orchestrator, service="svc2")) == {dl4["id"]}
    assert ids(await dead_letters(orchestrator, service="svc", definition="dlx")) == set()
    assert ids(await dead_letters(orchestrator, definition="nothing")) == set()

    page1 = await dead_letters(orchestrator, status="open", limit=3)
    assert len(page1["items"]) == 3 and page1["next_cursor"], page1
    page2 = await dead_letters(orchestrator, status="open", limit=3, cursor=page1["next_cursor"])
    assert len(page2["items"]) == 1 and page2["next_cursor"] is None, page2
    assert ids(page1) | ids(page2) == {dl1["id"], dl2["id"], dl3["id"], dl4["id"]}

    # The participant recovers; the operator retries the first compensation.
    participant.always("/a/undo", Reply(200, {"refunded": True}))
    r = await _retry(orchestrator, dl1["id"])
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "retried" and r.json()["resolved_by"] == ACTOR, r.text
    done = await finish(orchestrator, first["id"])
    assert done["status"] == "compensated", done
    assert done["steps"][0]["status"] == "compensated", done["steps"][0]
    undo = _calls_for(participant, "/a/undo", first["id"])
    assert len(undo) == 3
    assert {c.headers["idempotency-key"] for c in undo} == {f"{first['id']}:a:compensation"}
    assert undo[-1].headers["x-saga-attempt"] == "1"  # fresh attempts

    r = await _retry(orchestrator, dl1["id"])
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "retried"
    r = await _discard(orchestrator, dl1["id"], {"reason": "too late"})
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")

    # Discarding an open one, with a reason; idempotent; the saga stays failed.
    r = await _discard(orchestrator, dl2["id"], {"reason": "refunded by hand"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "discarded" and body["reason"] == "refunded by hand", body
    assert body["resolved_by"] == ACTOR and body["resolved_at"], body
    r = await _discard(orchestrator, dl2["id"], {"reason": "refunded by hand"})
    assert r.status_code == 200 and r.json()["status"] == "discarded", r.text
    assert (await saga(orchestrator, second["id"]))["status"] == "failed"
    r = await _retry(orchestrator, dl2["id"])
    assert r.status_code == 409, r.text

    # A discard needs a reason.
    for bad in ({}, {"reason": ""}):
        r = await _discard(orchestrator, dl3["id"], bad)
        assert r.status_code == 422, r.text
    r = await _retry(orchestrator, str(uuid.uuid4()))
    assert r.status_code == 404, r.text

    assert ids(await dead_letters(orchestrator, status="open")) == {dl3["id"], dl4["id"]}
    assert ids(await dead_letters(orchestrator, status="retried")) == {dl1["id"]}
    assert ids(await dead_letters(orchestrator, status="discarded")) == {dl2["id"]}

    entries = await admin_actions(orchestrator)
    done_actions = {(e["action"], e["target"]) for e in entries}
    assert ("dead_letter.retry", dl1["id"]) in done_actions, entries
    assert ("dead_letter.discard", dl2["id"]) in done_actions, entries
    assert all(e["actor"] == ACTOR and e["at"] for e in entries), entries
    (discard_entry,) = [e for e in entries if e["action"] == "dead_letter.discard"]
    assert discard_entry["details"].get("reason") == "refunded by hand", discard_entry


async def test_non_critical_step_is_dead_lettered_and_retried_while_saga_stays_completed(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/n", Reply(503))
    await put_service(orchestrator, "svc", participant.url, circuit_breaker=breaker())
    await define(
        orchestrator,
        "nc",
        [
            {"name": "a", "action": call("svc", "/a")},
            {
                "name": "n",
                "action": call("svc", "/n"),
                "critical": False,
                "retry": fast_retry(max_attempts=2),
            },
            {"name": "c", "action": call("svc", "/c")},
        ],
    )
    doc = await _run(orchestrator, "nc")
    assert doc["status"] == "completed", doc
    assert [s["status"] for s in doc["steps"]] == ["succeeded", "failed", "succeeded"], doc

    (dl,) = (await dead_letters(orchestrator, status="open"))["items"]
    assert dl["saga_id"] == doc["id"] and dl["step"] == "n", dl
    assert dl["direction"] == "action" and dl["attempts"] == 2, dl

    participant.always("/n", Reply(200, {"sent": True}))
    r = await _retry(orchestrator, dl["id"])
    assert r.status_code == 202, r.text

    seen: list[str] = []

    async def step_succeeded() -> dict[str, Any] | None:
        current = await saga(orchestrator, doc["id"])
        seen.append(current["status"])
        return current if current["steps"][1]["status"] == "succeeded" else None

    after = await eventually(step_succeeded, within=20, what="retried step succeeded")
    assert set(seen) == {"completed"}, seen
    assert after["steps"][1]["attempts"] == 1 and after["steps"][1]["response"] == {"sent": True}
    assert [s["status"] for s in after["steps"]] == ["succeeded", "succeeded", "succeeded"]
    assert after["finished_at"] is not None
    n_calls = _calls_for(participant, "/n", doc["id"])
    assert len(n_calls) == 3
    assert {c.headers["idempotency-key"] for c in n_calls} == {f"{doc['id']}:n:action"}
    assert len(participant.to("/a")) == 1 and len(participant.to("/c")) == 1
    assert (await dead_letters(orchestrator, status="open"))["items"] == []
    r = await _retry(orchestrator, dl["id"])
    assert r.status_code == 200, r.text


async def test_failure_after_pivot_is_dead_lettered_and_retry_resumes_forward(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/b", Reply(503))
    await put_service(orchestrator, "svc", participant.url, circuit_breaker=breaker())
    await define(
        orchestrator,
        "pv",
        [
            {"name": "a", "action": call("svc", "/a"), "compensation": call("svc", "/a/undo")},
            {"name": "p", "action": call("svc", "/p"), "pivot": True},
            {
                "name": "b",
                "action": call("svc", "/b"),
                "compensation": call("svc", "/b/undo"),
                "retry": fast_retry(max_attempts=2),
            },
            {"name": "c", "action": call("svc", "/c")},
        ],
    )
    doc = await _run(orchestrator, "pv")
    assert doc["status"] == "failed", doc
    assert doc["error"]["step"] == "b", doc["error"]
    assert [s["status"] for s in doc["steps"]] == ["succeeded", "succeeded", "failed", "pending"]
    assert participant.to("/a/undo") == [] and participant.to("/b/undo") == []

    (dl,) = (await dead_letters(orchestrator, status="open"))["items"]
    assert dl["step"] == "b" and dl["direction"] == "action" and dl["definition"] == "pv", dl

    participant.always("/b", Reply(200, {"ok": True}))
    r = await _retry(orchestrator, dl["id"])
    assert r.status_code == 202, r.text
    done = await finish(orchestrator, doc["id"])
    assert done["status"] == "completed", done
    assert [s["status"] for s in done["steps"]] == ["succeeded"] * 4
    assert done["steps"][2]["attempts"] == 1
    assert done["error"] is None, done["error"]
    assert participant.to("/a/undo") == [] and participant.to("/b/undo") == []
    assert len(participant.to("/b")) == 3 and len(participant.to("/c")) == 1
    assert len(participant.to("/a")) == 1 and len(participant.to("/p")) == 1


async def test_admin_endpoints_need_the_admin_token(
    orchestrator: httpx.AsyncClient, db_url: str, participant: Participant
) -> None:
    await put_service(orchestrator, "svc", participant.url)
    some_id = str(uuid.uuid4())
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/v1/admin/dead-letters", None),
        ("GET", f"/v1/admin/dead-letters/{some_id}", None),
        ("POST", f"/v1/admin/dead-letters/{some_id}/retry", None),
        ("POST", f"/v1/admin/dead-letters/{some_id}/discard", {"reason": "x"}),
        ("POST", "/v1/admin/services/svc/circuit/reset", None),
        ("GET", "/v1/admin/audit", None),
    ]

    async def check(client: httpx.AsyncClient, headers: dict[str, str], want: int) -> None:
        for method, path, body in calls:
            r = await client.request(method, path, json=body, headers=headers)
            assert r.status_code == want, (method, path, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json"), r.headers

    # No token, or a token that is no token of this deployment: not authenticated.
    await check(orchestrator, {}, 401)
    await check(orchestrator, {"Authorization": "Bearer not-a-known-token"}, 401)

    # With an API token configured, it opens /v1/ but not /v1/admin/.
    app = create_app(make_settings(SAGA_API_TOKEN="api"), db_url, run_executor=False)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=30) as guarded:
        r = await guarded.get("/v1/services", headers={"Authorization": "Bearer api"})
        assert r.status_code == 200, r.text
        await check(guarded, {}, 401)
        await check(guarded, {"Authorization": "Bearer api"}, 403)  # known, not admin
        r = await guarded.get("/v1/admin/dead-letters", headers=ADMIN)
        assert r.status_code == 200, r.text

    # None of the refused calls was recorded; the admin's own action is.
    assert await admin_actions(orchestrator) == []
    r = await orchestrator.post("/v1/admin/services/svc/circuit/reset", headers=ADMIN)
    assert r.status_code == 200, r.text
    (entry,) = await admin_actions(orchestrator)
    assert entry["actor"] == ACTOR, entry
    assert entry["action"] == "circuit.reset" and entry["target"] == "svc", entry
