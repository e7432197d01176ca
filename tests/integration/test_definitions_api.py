"""`POST/GET /v1/definitions…`: versions, idempotent registration, and every rule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings
from tests.support.api_helpers import (
    assert_problem,
    client_for,
    has_loc,
    service_doc,
    simple_definition,
)


async def _services(client: httpx.AsyncClient, *names: str) -> None:
    for name in names:
        r = await client.put(f"/v1/services/{name}", json=service_doc("http://127.0.0.1:9001"))
        assert r.status_code in (200, 201), r.text


@pytest.fixture
async def reg(api: httpx.AsyncClient) -> httpx.AsyncClient:
    """The API with services `pay` and `orders` registered."""
    await _services(api, "pay", "orders")
    return api


async def test_register_versions_and_idempotency(reg: httpx.AsyncClient) -> None:
    doc = simple_definition("checkout", description="first")
    r = await reg.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["name"] == "checkout"
    assert v1["version"] == 1
    assert v1["description"] == "first"
    assert [s["name"] for s in v1["steps"]] == ["a", "b"]
    assert v1["content_hash"]

    r = await reg.post("/v1/definitions", json=doc)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["content_hash"] == v1["content_hash"]
    assert r.json()["created_at"] == v1["created_at"]

    changed = copy.deepcopy(doc)
    changed["steps"][1]["action"]["path"] = "/b2"
    r = await reg.post("/v1/definitions", json=changed)
    assert r.status_code == 201, r.text
    v2 = r.json()
    assert v2["version"] == 2
    assert v2["content_hash"] != v1["content_hash"]

    # The latest is version 2 now; posting version 1's content again is new content.
    r = await reg.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 3


async def test_explicit_defaults_hash_the_same(reg: httpx.AsyncClient) -> None:
    doc = simple_definition("defaults")
    r = await reg.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text
    first = r.json()

    explicit = copy.deepcopy(doc)
    explicit["description"] = ""
    explicit["timeout_seconds"] = None
    for step in explicit["steps"]:
        step["timeout_seconds"] = None
        step["critical"] = True
        step["pivot"] = False
        step["fallback"] = None
        step["retry"] = {
            "max_attempts": 3,
            "initial_interval_seconds": 1,
            "backoff_coefficient": 2,
            "max_interval_seconds": 60,
            "jitter": True,
            "retry_on_status": [408, 425, 429, 500, 502, 503, 504],
        }
        step["compensation_retry"] = {"max_attempts": 10}
        step["action"]["method"] = "post"
        step["action"]["headers"] = {}
    explicit["steps"][1]["compensation"] = None

    r = await reg.post("/v1/definitions", json=explicit)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["content_hash"] == first["content_hash"]


async def test_defaults_are_filled_in(reg: httpx.AsyncClient) -> None:
    r = await reg.post("/v1/definitions", json=simple_definition("filled"))
    assert r.status_code == 201, r.text
    step = r.json()["steps"][0]
    assert step["critical"] is True
    assert step["pivot"] is False
    assert step["action"]["method"] == "POST"
    assert step["retry"] == {
        "max_attempts": 3,
        "initial_interval_seconds": 1,
        "backoff_coefficient": 2,
        "max_interval_seconds": 60,
        "jitter": True,
        "retry_on_status": [408, 425, 429, 500, 502, 503, 504],
    }
    assert step["compensation_retry"]["max_attempts"] == 10


async def test_get_latest_version_and_list(reg: httpx.AsyncClient) -> None:
    doc = simple_definition("checkout")
    assert (await reg.post("/v1/definitions", json=doc)).status_code == 201
    doc2 = simple_definition("checkout", description="second")
    assert (await reg.post("/v1/definitions", json=doc2)).status_code == 201
    other = simple_definition("refund", service="orders")
    assert (await reg.post("/v1/definitions", json=other)).status_code == 201

    r = await reg.get("/v1/definitions/checkout")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    assert r.json()["description"] == "second"

    r = await reg.get("/v1/definitions/checkout/versions/1")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1
    assert r.json()["description"] == ""

    r = await reg.get("/v1/definitions/checkout/versions/2")
    assert r.json()["description"] == "second"

    problem = assert_problem(await reg.get("/v1/definitions/checkout/versions/3"), 404)
    assert "3" in problem["detail"]
    assert_problem(await reg.get("/v1/definitions/checkout/versions/999999"), 404)
    assert_problem(await reg.get("/v1/definitions/nothing"), 404)
    assert_problem(await reg.get("/v1/definitions/nothing/versions/1"), 404)
    assert_problem(await reg.get("/v1/definitions/checkout/versions/0"), 422)
    assert_problem(await reg.get("/v1/definitions/checkout/versions/abc"), 422)

    r = await reg.get("/v1/definitions")
    assert r.status_code == 200, r.text
    page = r.json()
    assert [(d["name"], d["version"]) for d in page["items"]] == [("checkout", 2), ("refund", 1)]
    assert page["next_cursor"] is None


async def test_list_pagination(reg: httpx.AsyncClient) -> None:
    names = [f"def-{i}" for i in range(5)]
    for name in names:
        for description in ("v1", "v2"):
            doc = simple_definition(name, description=description)
            assert (await reg.post("/v1/definitions", json=doc)).status_code == 201
    seen: list[tuple[str, int]] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await reg.get("/v1/definitions", params=params)).json()
        seen.extend((d["name"], d["version"]) for d in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [(n, 2) for n in names]


# --- validation rules -------------------------------------------------------------


def _doc(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = simple_definition("checkout")
    mutate(doc)
    return doc


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _add_step(step: dict[str, Any], at: int | None = None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["steps"].insert(len(doc["steps"]) if at is None else at, step)

    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        for m in mutations:
            m(doc)

    return mutate


def _call(path: str = "/x", **extra: Any) -> dict[str, Any]:
    return {"service": "pay", "path": path, **extra}


RULES: list[tuple[str, Callable[[dict[str, Any]], None], tuple[Any, ...]]] = [
    ("bad-name-upper", _set(["name"], "Checkout"), ("body", "name")),
    ("bad-name-digit", _set(["name"], "1checkout"), ("body", "name")),
    ("bad-name-long", _set(["name"], "c" * 65), ("body", "name")),
    ("bad-name-empty", _set(["name"], ""), ("body", "name")),
    ("bad-step-name", _set(["steps", 0, "name"], "Step A"), ("body", "steps", 0, "name")),
    (
        "duplicate-step",
        _set(["steps", 1, "name"], "a"),
        ("body", "steps", 1, "name"),
    ),
    (
        "ref-later-step",
        _set(["steps", 0, "action", "body"], {"v": "${steps.b.response.id}"}),
        ("body", "steps", 0, "action", "body"),
    ),
    (
        "ref-self-in-action",
        _set(["steps", 1, "action", "body"], "${steps.b.status_code}"),
        ("body", "steps", 1, "action", "body"),
    ),
    (
        "ref-unknown-step",
        _set(["steps", 1, "action", "body"], {"v": "${steps.ghost.response.id}"}),
        ("body", "steps", 1, "action", "body"),
    ),
    (
        "ref-unknown-step-in-path",
        _set(["steps", 1, "action", "path"], "/orders/${steps.ghost.response.id}"),
        ("body", "steps", 1, "action", "path"),
    ),
    (
        "ref-unknown-step-in-headers",
        _set(["steps", 1, "action", "headers"], {"X-Ref": "${steps.ghost.status_code}"}),
        ("body", "steps", 1, "action", "headers"),
    ),
    (
        "ref-unknown-step-in-compensation",
        _set(["steps", 0, "compensation", "body"], {"v": "${steps.b.response.id}"}),
        ("body", "steps", 0, "compensation", "body"),
    ),
    (
        "ref-bad-root",
        _set(["steps", 0, "action", "body"], {"v": "${foo.bar}"}),
        ("body", "steps", 0, "action", "body"),
    ),
    (
        "ref-bad-saga-field",
        _set(["steps", 0, "action", "body"], {"v": "${saga.name}"}),
        ("body", "steps", 0, "action", "body"),
    ),
    (
        "ref-steps-without-response",
        _set(["steps", 1, "action", "body"], {"v": "${steps.a.id}"}),
        ("body", "steps", 1, "action", "body"),
    ),
    (
        "ref-empty",
        _set(["steps", 0, "action", "body"], "${}"),
        ("body", "steps", 0, "action", "body"),
    ),
    (
        "unknown-service",
        _set(["steps", 1, "action", "service"], "nosuch"),
        ("body", "steps", 1, "action", "service"),
    ),
    (
        "unknown-service-compensation",
        _set(["steps", 0, "compensation", "service"], "nosuch"),
        ("body", "steps", 0, "compensation", "service"),
    ),
    (
        "url-ftp",
        _set(["steps", 0, "action"], {"url": "ftp://127.0.0.1/x"}),
        ("body", "steps", 0, "action"),
    ),
    (
        "url-javascript",
        _set(["steps", 0, "action"], {"url": "javascript:alert(1)"}),
        ("body", "steps", 0, "action"),
    ),
    (
        "url-and-service",
        _set(["steps", 0, "action"], {"url": "http://127.0.0.1/x", "service": "pay"}),
        ("body", "steps", 0, "action"),
    ),
    (
        "path-without-slash",
        _set(["steps", 0, "action", "path"], "charges"),
        ("body", "steps", 0, "action"),
    ),
    (
        "two-pivots",
        _both(_set(["steps", 0, "pivot"], True), _set(["steps", 1, "pivot"], True)),
        ("body", "steps"),
    ),
    (
        "retry-max-attempts-zero",
        _set(["steps", 0, "retry"], {"max_attempts": 0}),
        ("body", "steps", 0, "retry", "max_attempts"),
    ),
    (
        "retry-negative-initial",
        _set(["steps", 0, "retry"], {"initial_interval_seconds": -1}),
        ("body", "steps", 0, "retry", "initial_interval_seconds"),
    ),
    (
        "retry-max-below-initial",
        _set(["steps", 0, "retry"], {"initial_interval_seconds": 5, "max_interval_seconds": 1}),
        ("body", "steps", 0, "retry"),
    ),
    (
        "retry-on-200",
        _set(["steps", 0, "retry"], {"retry_on_status": [500, 200]}),
        ("body", "steps", 0, "retry"),
    ),
    (
        "retry-on-99",
        _set(["steps", 0, "retry"], {"retry_on_status": [99]}),
        ("body", "steps", 0, "retry", "retry_on_status", 0),
    ),
    (
        "compensation-retry-zero",
        _set(["steps", 0, "compensation_retry"], {"max_attempts": 0}),
        ("body", "steps", 0, "compensation_retry", "max_attempts"),
    ),
    (
        "backoff-below-one",
        _set(["steps", 0, "retry"], {"backoff_coefficient": 0.5}),
        ("body", "steps", 0, "retry", "backoff_coefficient"),
    ),
    ("empty-steps", _set(["steps"], []), ("body", "steps")),
    ("missing-steps", lambda d: d.pop("steps"), ("body", "steps")),
    (
        "step-without-target",
        _set(["steps", 0, "action"], {"method": "POST", "body": {}}),
        ("body", "steps", 0, "action"),
    ),
    (
        "step-service-without-path",
        _set(["steps", 0, "action"], {"service": "pay"}),
        ("body", "steps", 0, "action"),
    ),
    ("step-without-action", lambda d: d["steps"][0].pop("action"), ("body", "steps", 0, "action")),
    (
        "bad-method",
        _set(["steps", 0, "action", "method"], "TRACE"),
        ("body", "steps", 0, "action", "method"),
    ),
    (
        "reserved-header",
        _set(["steps", 0, "action", "headers"], {"Idempotency-Key": "x"}),
        ("body", "steps", 0, "action", "headers"),
    ),
    (
        "step-timeout-zero",
        _set(["steps", 0, "timeout_seconds"], 0),
        ("body", "steps", 0, "timeout_seconds"),
    ),
    ("definition-timeout-negative", _set(["timeout_seconds"], -5), ("body", "timeout_seconds")),
    ("unknown-field", _set(["owner"], "me"), ("body", "owner")),
    ("unknown-step-field", _set(["steps", 0, "retries"], 3), ("body", "steps", 0, "retries")),
]


@pytest.mark.parametrize(
    "mutate,loc", [(m, loc) for _, m, loc in RULES], ids=[i for i, _, _ in RULES]
)
async def test_rule_rejected_with_loc(
    reg: httpx.AsyncClient, mutate: Callable[[dict[str, Any]], None], loc: tuple[Any, ...]
) -> None:
    r = await reg.post("/v1/definitions", json=_doc(mutate))
    problem = assert_problem(r, 422)
    assert problem["errors"], problem
    assert has_loc(problem, *loc), (loc, problem["errors"])
    for err in problem["errors"]:
        assert set(err) >= {"loc", "msg", "type"}
        assert err["msg"]


async def test_url_host_not_allowed(db_url: str) -> None:
    settings = make_settings(SAGA_ALLOWED_HOSTS="127.0.0.1:*")
    async with client_for(settings, db_url) as client:
        doc = {
            "name": "ssrf",
            "steps": [
                {"name": "a", "action": {"url": "http://127.0.0.1:9001/a"}},
                {"name": "b", "action": {"url": "http://169.254.169.254/latest/meta-data"}},
                {
                    "name": "c",
                    "action": {"url": "http://127.0.0.1:9002/c"},
                    "compensation": {"url": "https://evil.example.com/undo"},
                },
            ],
        }
        problem = assert_problem(await client.post("/v1/definitions", json=doc), 422)
        assert has_loc(problem, "body", "steps", 1, "action", "url"), problem
        assert has_loc(problem, "body", "steps", 2, "compensation", "url"), problem
        assert not has_loc(problem, "body", "steps", 0), problem
        assert_problem(await client.get("/v1/definitions/ssrf"), 404)

        ok = {"name": "ok", "steps": [{"name": "a", "action": {"url": "http://127.0.0.1:1/a"}}]}
        r = await client.post("/v1/definitions", json=ok)
        assert r.status_code == 201, r.text


async def test_several_violations_reported_together(reg: httpx.AsyncClient) -> None:
    doc = simple_definition("multi")
    doc["steps"][1]["name"] = "a"
    doc["steps"][1]["action"]["service"] = "ghost"
    problem = assert_problem(await reg.post("/v1/definitions", json=doc), 422)
    assert has_loc(problem, "body", "steps", 1, "name")
    assert has_loc(problem, "body", "steps", 1, "action", "service")


async def test_valid_references_are_accepted(reg: httpx.AsyncClient) -> None:
    doc = {
        "name": "refs",
        "steps": [
            {"name": "a", "action": _call("/a", body={"all": "${input}", "id": "${saga.id}"})},
            {
                "name": "b",
                "action": _call(
                    "/b/${steps.a.response.id}",
                    headers={"X-From-A": "${steps.a.status_code}"},
                    body={"n": "${input.items.0.qty}", "t": "id=${steps.a.response.id}!"},
                ),
                "compensation": _call("/b/undo", body={"b": "${steps.b.response.id}"}),
                "pivot": True,
            },
        ],
    }
    r = await reg.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text


async def test_rejection_leaves_stored_definitions_unchanged(reg: httpx.AsyncClient) -> None:
    doc = simple_definition("stable")
    assert (await reg.post("/v1/definitions", json=doc)).status_code == 201
    doc2 = simple_definition("stable", description="v2")
    r = await reg.post("/v1/definitions", json=doc2)
    assert r.status_code == 201
    latest = r.json()

    for _, mutate, loc in RULES:
        if loc == ("body", "name"):
            continue  # those rename the document away from "stable"
        bad = simple_definition("stable", description="bad")
        mutate(bad)
        r = await reg.post("/v1/definitions", json=bad)
        assert_problem(r, 422)

    r = await reg.get("/v1/definitions/stable")
    assert r.status_code == 200
    # The registration's answer is the stored definition plus its checklist warnings.
    assert latest.pop("warnings") == []
    assert r.json() == latest
    assert_problem(await reg.get("/v1/definitions/stable/versions/3"), 404)
    items = (await reg.get("/v1/definitions")).json()["items"]
    assert [(d["name"], d["version"]) for d in items] == [("stable", 2)]


async def test_a_start_follows_a_version_registered_by_another_replica(
    reg: httpx.AsyncClient, db_url: str
) -> None:
    """A start on the latest version finds the one registered a moment ago through
    another API process, although this process remembers the one before (it checks in
    the creating statement); a start pinned to a version keeps it."""
    first = simple_definition("moving", description="one")
    assert (await reg.post("/v1/definitions", json=first)).status_code == 201
    r = await reg.post("/v1/sagas", json={"definition": "moving", "input": {"x": 1}})
    assert r.status_code == 201 and r.json()["definition_version"] == 1
    async with client_for(make_settings(), db_url) as other:
        second = simple_definition("moving", description="two")
        assert (await other.post("/v1/definitions", json=second)).status_code == 201
    for _ in range(2):  # the second start reads nothing: it remembers version 2
        r = await reg.post("/v1/sagas", json={"definition": "moving", "input": {"x": 1}})
        assert r.status_code == 201 and r.json()["definition_version"] == 2
    pinned = {"definition": "moving", "version": 1, "input": {"x": 1}}
    r = await reg.post("/v1/sagas", json=pinned)
    assert r.status_code == 201 and r.json()["definition_version"] == 1
