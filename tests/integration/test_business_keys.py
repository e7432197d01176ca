"""Business keys and labels: validated on start, shown in the views, bound to the
Idempotency-Key, filterable (on their indexes) with cursor pagination; and exclusive
definitions, whose rule (one unfinished saga per business key) the database holds."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import event

from app.store.db import make_engine
from app.store.sagas import SagaStore
from app.usecases.sagas import StartRequest, fingerprint
from tests.conftest import ADMIN_TOKEN, make_settings, wait_terminal
from tests.support.api_helpers import assert_problem, client_for, has_loc
from tests.support.engine_helpers import define, put_service, step
from tests.support.servers import Participant, Reply


async def _flow(client: httpx.AsyncClient, name: str = "flow", **extra: Any) -> None:
    await put_service(client, "http://127.0.0.1:9")
    await define(client, name, [step("a", compensate=False)], **extra)


async def _start(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    headers = {}
    if "key" in body:
        headers["Idempotency-Key"] = body.pop("key")
    return await client.post(
        "/v1/sagas", json={"definition": "flow", "input": {}, **body}, headers=headers
    )


# --- validation -------------------------------------------------------------------------

BAD_STARTS = [
    ({"business_key": ""}, ("body", "business_key")),
    ({"business_key": "x" * 256}, ("body", "business_key")),
    ({"business_key": "order\n1"}, ("body", "business_key")),
    ({"business_key": "tab\there"}, ("body", "business_key")),
    ({"business_key": 1001}, ("body", "business_key")),
    ({"labels": {f"k{i}": "v" for i in range(17)}}, ("body", "labels")),
    ({"labels": {"Tenant": "acme"}}, ("body", "labels")),
    ({"labels": {"1tenant": "acme"}}, ("body", "labels")),
    ({"labels": {"k" * 64: "acme"}}, ("body", "labels")),
    ({"labels": {"tenant": ""}}, ("body", "labels")),
    ({"labels": {"tenant": "a" * 256}}, ("body", "labels")),
    ({"labels": {"tenant": "a\u0007b"}}, ("body", "labels")),
    ({"labels": {"tenant": 7}}, ("body", "labels")),
    ({"labels": ["tenant:acme"]}, ("body", "labels")),
]


async def test_bad_business_keys_and_labels_are_422_saying_what_to_fix(
    api: httpx.AsyncClient,
) -> None:
    await _flow(api)
    for body, loc in BAD_STARTS:
        r = await _start(api, **body)
        problem = assert_problem(r, 422)
        assert has_loc(problem, *loc), (body, problem)
        assert all(e["msg"] for e in problem["errors"]), problem
    # The edges of what is allowed.
    good = {
        "business_key": "é" * 255,
        "labels": {
            **{f"k{i}": "v" for i in range(15)},
            "a.b_c-d" + "x" * 56: "with spaces: and colons",
        },
    }
    r = await _start(api, **good)
    assert r.status_code == 201, r.text
    assert r.json()["business_key"] == good["business_key"]
    assert r.json()["labels"] == good["labels"]


async def test_bad_list_filters_are_422(api: httpx.AsyncClient) -> None:
    for params, name in [
        ({"label": "no-colon"}, "label"),
        ({"label": "Tenant:acme"}, "label"),
        ({"label": "tenant:"}, "label"),
        ({"label": [f"k{i}:v" for i in range(17)]}, "label"),
        ({"business_key": "a\nb"}, "business_key"),
        ({"business_key": ""}, "business_key"),
        ({"business_key": "x" * 256}, "business_key"),
    ]:
        problem = assert_problem(await api.get("/v1/sagas", params=params), 422)
        assert has_loc(problem, "query", name), (params, problem)


# --- the views and the idempotency fingerprint --------------------------------------------


async def test_business_key_and_labels_are_in_every_view(api: httpx.AsyncClient) -> None:
    await _flow(api)
    created = await _start(api, business_key="order-7", labels={"tenant": "acme"})
    assert created.status_code == 201, created.text
    saga = created.json()
    assert (saga["business_key"], saga["labels"]) == ("order-7", {"tenant": "acme"})
    got = (await api.get(f"/v1/sagas/{saga['id']}")).json()
    assert got == saga
    (item,) = (await api.get("/v1/sagas")).json()["items"]
    assert (item["business_key"], item["labels"]) == ("order-7", {"tenant": "acme"})
    plain = (await _start(api)).json()
    assert (plain["business_key"], plain["labels"]) == (None, {})
    assert (await api.get(f"/v1/sagas/{plain['id']}")).json() == plain


async def test_business_key_and_labels_are_bound_to_the_idempotency_key(
    api: httpx.AsyncClient,
) -> None:
    await _flow(api)
    first = await _start(api, key="k-1", business_key="order-1", labels={"tenant": "acme"})
    assert first.status_code == 201, first.text
    same = await _start(api, key="k-1", business_key="order-1", labels={"tenant": "acme"})
    assert same.status_code == 200 and same.headers["Idempotent-Replayed"] == "true"
    assert same.json()["id"] == first.json()["id"]
    for other in (
        {"business_key": "order-2", "labels": {"tenant": "acme"}},
        {"labels": {"tenant": "acme"}},
        {"business_key": "order-1"},
        {"business_key": "order-1", "labels": {"tenant": "other"}},
        {"business_key": "order-1", "labels": {"tenant": "acme", "extra": "x"}},
    ):
        problem = assert_problem(await _start(api, key="k-1", **other), 422)
        assert "business_key or labels" in problem["detail"], problem
    # Without them, a key replays as it did before business keys existed: `labels: {}`
    # and no labels are one and the same start.
    bare = await _start(api, key="k-2")
    assert (await _start(api, key="k-2", labels={})).status_code == 200
    assert bare.status_code == 201


def test_the_fingerprint_of_a_start_without_keys_or_labels_is_unchanged() -> None:
    """Keys stored before this release keep replaying after the upgrade."""
    old = hashlib.sha256(
        json.dumps(
            {"definition": "flow", "version": None, "input": {"a": 1}},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
    ).hexdigest()
    assert fingerprint(StartRequest("flow", None, {"a": 1})) == old
    assert fingerprint(StartRequest("flow", None, {"a": 1}, business_key="b")) != old
    assert fingerprint(StartRequest("flow", None, {"a": 1}, labels={"k": "v"})) != old


# --- list filters -------------------------------------------------------------------------


async def _all_pages(api: httpx.AsyncClient, params: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page_params = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await api.get("/v1/sagas", params=page_params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def test_list_filters_combine_and_page(api: httpx.AsyncClient, db_url: str) -> None:
    await _flow(api)
    await define(api, "other", [step("a", compensate=False)])
    made: list[dict[str, Any]] = []
    for i in range(12):
        body: dict[str, Any] = {
            "definition": "flow" if i % 3 else "other",
            "business_key": f"order-{i % 2}",
            "labels": {"tenant": "acme" if i < 8 else "umbrella", "parity": str(i % 2)},
        }
        r = await api.post("/v1/sagas", json=body)
        assert r.status_code == 201, r.text
        made.append(r.json())
    await _start(api)  # no key, no labels
    with psycopg.connect(db_url, autocommit=True) as conn:  # one of them finished
        conn.execute(
            "UPDATE sagas SET status = 'completed', finished_at = now(), due_at = NULL "
            "WHERE id = %s",
            (made[4]["id"],),
        )
    newest_first = list(reversed(made))

    def expect(pred: Any) -> list[str]:
        return [s["id"] for s in newest_first if pred(s)]

    cases: list[tuple[dict[str, Any], Any]] = [
        ({"business_key": "order-0"}, lambda s: s["business_key"] == "order-0"),
        ({"label": "tenant:acme"}, lambda s: s["labels"]["tenant"] == "acme"),
        (
            {"label": ["tenant:acme", "parity:1"]},
            lambda s: s["labels"] == {"tenant": "acme", "parity": "1"},
        ),
        (
            {"label": "tenant:umbrella", "business_key": "order-1"},
            lambda s: s["labels"]["tenant"] == "umbrella" and s["business_key"] == "order-1",
        ),
        (
            {"label": "tenant:acme", "definition": "flow"},
            lambda s: s["labels"]["tenant"] == "acme" and s["definition"] == "flow",
        ),
        (
            {"business_key": "order-0", "status": "running"},
            lambda s: s["business_key"] == "order-0" and s["id"] != made[4]["id"],
        ),
        ({"business_key": "order-0", "status": "completed"}, lambda s: s["id"] == made[4]["id"]),
        ({"label": ["tenant:acme", "tenant:umbrella"]}, lambda s: False),
        ({"label": "tenant:nobody"}, lambda s: False),
        ({"business_key": "order-9"}, lambda s: False),
    ]
    for params, pred in cases:
        got = [s["id"] for s in await _all_pages(api, params)]
        assert got == expect(pred), params
        assert got or not expect(pred)
    assert len(await _all_pages(api, {})) == 13


# --- the filters use their indexes ------------------------------------------------------------

SEED = """
INSERT INTO definitions (name, version, content_hash, spec)
VALUES ('flow', 1, 'h', '{"name": "flow", "steps": []}');
INSERT INTO sagas (id, definition_id, definition_name, definition_version, status, input,
                   finished_at, business_key, labels)
SELECT gen_random_uuid(), 1, 'flow', 1, 'completed', '{}', now(),
       CASE WHEN n % 4 = 0 THEN NULL ELSE 'order-' || n END,
       jsonb_build_object('tenant', 't' || (n % 2000), 'channel', 'web')
  FROM generate_series(1, 20000) AS n;
ANALYZE sagas;
"""


async def _plan_of_list(db_url: str, **filters: Any) -> str:
    """EXPLAIN of the very statement `SagaStore.list_page` runs with these filters."""
    engine = make_engine(db_url)
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM sagas" in statement and not seen:
            seen.append((statement, params))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        await SagaStore(engine).list_page(50, **filters)
        (statement, params), *_ = seen
        async with engine.connect() as conn:
            rows = await conn.exec_driver_sql("EXPLAIN " + statement, params)
            return "\n".join(r[0] for r in rows)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({"business_key": "order-4711"}, "ix_sagas_business_key"),
        ({"labels": {"tenant": "t17"}}, "ix_sagas_labels"),
        ({"labels": {"tenant": "t17", "channel": "web"}}, "ix_sagas_labels"),
    ],
)
async def test_list_filters_use_their_indexes(
    db_url: str, filters: dict[str, Any], index: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SEED)
    plan = await _plan_of_list(db_url, **filters)
    assert index in plan, plan
    assert "Seq Scan" not in plan, plan


# --- exclusive definitions ------------------------------------------------------------------


async def test_exclusive_needs_a_business_key_and_shows_in_the_definition(
    api: httpx.AsyncClient,
) -> None:
    await _flow(api, exclusive=True)
    definition = (await api.get("/v1/definitions/flow")).json()
    assert definition["exclusive"] is True
    problem = assert_problem(await _start(api), 422)
    assert has_loc(problem, "body", "business_key"), problem
    assert "exclusive" in problem["detail"]
    # exclusive is part of the content: without it, the definition has a new version.
    again = await api.post(
        "/v1/definitions", json={"name": "flow", "steps": [step("a", compensate=False)]}
    )
    assert again.status_code == 201 and again.json()["exclusive"] is False


async def test_a_definition_registered_before_exclusive_keeps_its_hash() -> None:
    from app.core.definition import DefinitionSpec

    spec = DefinitionSpec.model_validate({"name": "flow", "steps": [step("a")]})
    legacy = spec.model_dump(mode="json")
    legacy.pop("exclusive")
    legacy.pop("notify")  # added later still: a v1 document had neither
    for one in legacy["steps"]:
        one.pop("callback")  # nor a step's callback
    canonical = json.dumps(legacy, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert spec.content_hash() == hashlib.sha256(canonical.encode()).hexdigest()
    exclusive = DefinitionSpec.model_validate({**legacy, "exclusive": True})
    assert exclusive.content_hash() != spec.content_hash()


async def test_fifty_concurrent_starts_on_two_replicas_make_one_saga(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    """One business key, fifty starts at once through two API processes: one saga,
    forty-nine 409s naming it; once it has finished, the key can start a new one."""
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "flow", [step("a", compensate=False)], exclusive=True)
    participant.script("/a", Reply(delay=3.0))
    body = {"definition": "flow", "input": {}, "business_key": "order-1"}
    async with client_for(make_settings(), db_url) as replica:
        clients = [orchestrator, replica]
        responses = await asyncio.gather(
            *(clients[i % 2].post("/v1/sagas", json=body) for i in range(50))
        )
    created = [r for r in responses if r.status_code == 201]
    assert len(created) == 1, [(r.status_code, r.text) for r in responses]
    saga_id = created[0].json()["id"]
    for r in responses:
        if r is created[0]:
            continue
        problem = assert_problem(r, 409)
        assert r.headers["Location"] == f"/v1/sagas/{saga_id}", r.headers
        assert saga_id in problem["detail"]
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM sagas").fetchone()
        assert row is not None and row[0] == 1

    # Another key, another definition, or a non-exclusive definition: not held.
    assert (await orchestrator.post("/v1/sagas", json={**body, "business_key": "o-2"})).is_success
    await define(orchestrator, "loose", [step("a", compensate=False)])
    loose = {**body, "definition": "loose"}
    assert (await orchestrator.post("/v1/sagas", json=loose)).status_code == 201
    assert (await orchestrator.post("/v1/sagas", json=loose)).status_code == 201

    done = await wait_terminal(orchestrator, saga_id)
    assert done["status"] == "completed"
    again = await orchestrator.post("/v1/sagas", json=body)
    assert again.status_code == 201, again.text
    assert again.json()["id"] != saga_id


async def test_an_exclusive_key_is_free_again_after_compensation_and_replays_keep_working(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "flow", [step("a"), step("b")], exclusive=True)
    participant.script("/b", Reply(status=400))
    participant.script("/a", Reply(delay=1.0))
    body = {"definition": "flow", "input": {}, "business_key": "order-9"}
    first = await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": "i-1"})
    assert first.status_code == 201, first.text
    # The same Idempotency-Key is a replay, not a conflict.
    replay = await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": "i-1"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    # A refused start stores nothing: its key is free to start the saga later.
    busy = await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": "i-2"})
    assert_problem(busy, 409)
    done = await wait_terminal(orchestrator, first.json()["id"])
    assert done["status"] == "compensated", done
    later = await orchestrator.post("/v1/sagas", json=body, headers={"Idempotency-Key": "i-2"})
    assert later.status_code == 201, later.text


async def test_retrying_a_dead_letter_waits_for_the_key_to_be_free(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """A failed saga is terminal, so its key may start a new saga; an operator's retry of
    the old one's dead letter (which would make two unfinished) is a 409 until the new one
    has finished."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await put_service(orchestrator, participant.url)
    steps = [step("a"), step("b")]
    steps[0]["compensation_retry"] = {**steps[0]["compensation_retry"], "max_attempts": 1}
    await define(orchestrator, "flow", steps, exclusive=True)
    participant.script("/b", Reply(status=400))
    participant.script("/a/undo", Reply(status=500))
    body = {"definition": "flow", "input": {}, "business_key": "order-3"}
    first = (await orchestrator.post("/v1/sagas", json=body)).json()
    assert (await wait_terminal(orchestrator, first["id"]))["status"] == "failed"
    (letter,) = (
        await orchestrator.get("/v1/admin/dead-letters", params={"status": "open"}, headers=admin)
    ).json()["items"]

    participant.script("/a", Reply(delay=2.0))
    second = await orchestrator.post("/v1/sagas", json=body)
    assert second.status_code == 201, second.text
    retry = f"/v1/admin/dead-letters/{letter['id']}/retry"
    refused = await orchestrator.post(retry, headers=admin)
    problem = assert_problem(refused, 409)
    assert "exclusive" in problem["detail"]
    still = (await orchestrator.get(f"/v1/sagas/{first['id']}")).json()
    assert still["status"] == "failed"
    assert (await wait_terminal(orchestrator, second.json()["id"]))["status"] == "completed"
    assert (await orchestrator.post(retry, headers=admin)).status_code in (200, 202)
    assert (await wait_terminal(orchestrator, first["id"]))["status"] == "compensated"


async def test_the_typed_client_starts_with_keys_and_labels_and_filters(
    api: httpx.AsyncClient,
) -> None:
    from app.client import ApiError, SagaClient

    await _flow(api, exclusive=True)
    async with SagaClient(str(api.base_url), retry_for_seconds=1) as client:
        started = await client.start_saga(
            "flow", {}, business_key="order-5", labels={"tenant": "acme"}
        )
        saga = started.saga
        assert (saga["business_key"], saga["labels"]) == ("order-5", {"tenant": "acme"})
        with pytest.raises(ApiError) as refused:
            await client.start_saga("flow", {}, business_key="order-5")
        assert refused.value.status == 409
        assert refused.value.location == f"/v1/sagas/{saga['id']}"
        await client.start_saga("flow", {}, business_key="order-6", labels={"tenant": "other"})
        page = await client.list_sagas(labels={"tenant": "acme"}, limit=10)
        assert [s["id"] for s in page["items"]] == [saga["id"]]
        page = await client.list_sagas(business_key="order-6", status="running")
        assert [s["business_key"] for s in page["items"]] == ["order-6"]
        first = await client.list_sagas(limit=1)
        assert first["next_cursor"] and len(first["items"]) == 1
        rest = await client.list_sagas(limit=1, cursor=first["next_cursor"])
        assert rest["items"][0]["id"] == saga["id"]
