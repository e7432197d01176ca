"""A battery of bad input: never a 5xx, always problem+json, and nothing stored changes."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import make_settings
from tests.support import pg
from tests.support.api_helpers import assert_problem, client_for, service_doc, simple_definition

JSON_HEADERS = {"content-type": "application/json"}
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def cursor_of(value: Any) -> str:
    """A cursor in the server's encoding (url-safe base64 of JSON) holding any value."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@dataclass
class Case:
    id: str
    method: str
    path: str  # "{saga}" is replaced by the seeded saga's id
    expect: set[int]
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"headers": self.headers}
        if self.json is not None:
            out["json"] = self.json
        if self.content is not None:
            out["content"] = self.content
            out["headers"] = {**JSON_HEADERS, **self.headers}
        if self.params is not None:
            out["params"] = self.params
        return out


BAD = {400, 422}
DEF = simple_definition("flow2", service="pay")


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # --- malformed JSON ----------------------------------------------------------
    bodies = {
        "truncated": b'{"base_url": "http://127.0.0.1:9001"',
        "trailing-garbage": b'{"base_url": "http://127.0.0.1:9001"} trailing',
        "single-quotes": b"{'base_url': 'http://127.0.0.1:9001'}",
        "bare-word": b"hello",
        "comma-only": b",",
        "unclosed-string": b'{"base_url": "http://127',
    }
    for name, raw in bodies.items():
        add(Case(f"service-malformed-{name}", "PUT", "/v1/services/pay", {400}, content=raw))
        add(Case(f"definition-malformed-{name}", "POST", "/v1/definitions", {400}, content=raw))
        add(Case(f"saga-malformed-{name}", "POST", "/v1/sagas", {400}, content=raw))
    # --- wrong types ---------------------------------------------------------------
    add(
        Case(
            "timeout-string",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(timeout_seconds="five"),
        )
    )
    add(
        Case(
            "timeout-list", "PUT", "/v1/services/pay", {422}, json=service_doc(timeout_seconds=[5])
        )
    )
    add(
        Case(
            "concurrency-float",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(max_concurrency=2.5),
        )
    )
    add(Case("headers-list", "PUT", "/v1/services/pay", {422}, json=service_doc(headers=["a"])))
    add(
        Case(
            "header-value-int",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(headers={"X-A": 1}),
        )
    )
    add(Case("base-url-null", "PUT", "/v1/services/pay", {422}, json={"base_url": None}))
    add(Case("service-root-list", "PUT", "/v1/services/pay", {422}, content=b"[]"))
    add(Case("definition-root-list", "POST", "/v1/definitions", {422}, content=b"[1, 2]"))
    add(Case("saga-root-list", "POST", "/v1/sagas", {422}, content=b'["flow"]'))
    add(Case("service-root-null", "PUT", "/v1/services/pay", BAD, content=b"null"))
    add(Case("definition-root-string", "POST", "/v1/definitions", {422}, content=b'"flow"'))
    add(Case("definition-name-null", "POST", "/v1/definitions", {422}, json={**DEF, "name": None}))
    add(
        Case(
            "definition-steps-object",
            "POST",
            "/v1/definitions",
            {422},
            json={**DEF, "steps": {"a": 1}},
        )
    )
    add(
        Case(
            "saga-definition-null",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": None, "input": {}},
        )
    )
    add(Case("saga-definition-int", "POST", "/v1/sagas", {422}, json={"definition": 5}))
    add(
        Case(
            "saga-version-string",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "version": "latest"},
        )
    )
    add(
        Case(
            "saga-version-zero",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "version": 0},
        )
    )
    add(
        Case(
            "saga-version-huge",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "version": 10**30},
        )
    )
    add(
        Case(
            "saga-unknown-definition",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "nosuch", "input": {}},
        )
    )
    add(
        Case(
            "saga-unknown-version",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "version": 99},
        )
    )
    add(
        Case(
            "saga-unknown-field",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "inputs": {}},
        )
    )
    # --- bare scalars and empty bodies ---------------------------------------------------
    for name, raw in {"number": b"42", "float": b"-1.5e3", "true": b"true", "empty": b""}.items():
        expect = BAD
        add(Case(f"service-bare-{name}", "PUT", "/v1/services/pay", expect, content=raw))
        add(Case(f"definition-bare-{name}", "POST", "/v1/definitions", expect, content=raw))
        add(Case(f"saga-bare-{name}", "POST", "/v1/sagas", expect, content=raw))
    # --- NUL characters --------------------------------------------------------------
    nul = "a\u0000b"
    add(
        Case(
            "nul-base-url",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(f"http://127.0.0.1:9001/{nul}"),
        )
    )
    add(
        Case(
            "nul-header-value",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(headers={"X-Key": nul}),
        )
    )
    add(
        Case(
            "nul-header-name",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc(headers={nul: "v"}),
        )
    )
    add(Case("nul-description", "POST", "/v1/definitions", {422}, json={**DEF, "description": nul}))
    nul_body = simple_definition("flow2", service="pay")
    nul_body["steps"][0]["action"]["body"] = {"deep": [{"k": nul}]}
    add(Case("nul-step-body", "POST", "/v1/definitions", {422}, json=nul_body))
    nul_key = simple_definition("flow2", service="pay")
    nul_key["steps"][0]["action"]["body"] = {nul: 1}
    add(Case("nul-step-body-key", "POST", "/v1/definitions", {422}, json=nul_key))
    add(
        Case(
            "nul-saga-input",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "input": {"x": nul}},
        )
    )
    add(
        Case(
            "nul-saga-input-key",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "input": {nul: 1}},
        )
    )
    add(
        Case(
            "nul-saga-input-bare",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow", "input": "\u0000"},
        )
    )
    # --- other strings and numbers PostgreSQL's jsonb cannot hold --------------------
    add(
        Case(
            "lone-surrogate-saga-input",
            "POST",
            "/v1/sagas",
            {422},
            content=b'{"definition": "flow", "input": {"x": "\\ud800"}}',
        )
    )
    add(
        Case(
            "lone-surrogate-description",
            "POST",
            "/v1/definitions",
            {422},
            content=json.dumps({**DEF, "description": "X"}).replace('"X"', '"\\udfff"').encode(),
        )
    )
    add(
        Case(
            "lone-surrogate-header",
            "PUT",
            "/v1/services/pay",
            {422},
            content=b'{"base_url": "http://127.0.0.1:9001", "headers": {"X-A": "\\ud800"}}',
        )
    )
    surrogate_body = simple_definition("flow2", service="pay")
    surrogate_body["steps"][0]["action"]["body"] = {"k": "S"}
    add(
        Case(
            "lone-surrogate-step-body",
            "POST",
            "/v1/definitions",
            {422},
            content=json.dumps(surrogate_body).replace('"S"', '"\\ud800"').encode(),
        )
    )
    add(
        Case(
            "lone-surrogate-saga-input-key",
            "POST",
            "/v1/sagas",
            {422},
            content=b'{"definition": "flow", "input": {"\\udc00": 1}}',
        )
    )
    add(
        Case(
            "reversed-surrogate-pair-saga-input",
            "POST",
            "/v1/sagas",
            {422},
            content=b'{"definition": "flow", "input": ["\\udc00\\ud800"]}',
        )
    )
    add(
        Case(
            "nan-saga-input",
            "POST",
            "/v1/sagas",
            BAD,
            content=b'{"definition": "flow", "input": {"x": NaN}}',
        )
    )
    add(
        Case(
            "infinity-saga-input",
            "POST",
            "/v1/sagas",
            BAD,
            content=b'{"definition": "flow", "input": {"x": Infinity}}',
        )
    )
    add(
        Case(
            "overflow-float-saga-input",
            "POST",
            "/v1/sagas",
            BAD,
            content=b'{"definition": "flow", "input": {"x": 1e400}}',
        )
    )
    add(
        Case(
            "huge-int-saga-input",
            "POST",
            "/v1/sagas",
            BAD,
            content=b'{"definition": "flow", "input": {"x": ' + b"9" * 5000 + b"}}",
        )
    )
    add(
        Case(
            "overflow-float-timeout",
            "PUT",
            "/v1/services/pay",
            BAD,
            content=b'{"base_url": "http://127.0.0.1:9001", "timeout_seconds": 1e400}',
        )
    )
    # --- deep nesting ----------------------------------------------------------------
    add(
        Case(
            "deep-saga-input",
            "POST",
            "/v1/sagas",
            BAD,
            content=b'{"definition": "flow", "input": ' + deep(5000) + b"}",
        )
    )
    add(
        Case(
            "deep-service-body",
            "PUT",
            "/v1/services/pay",
            BAD,
            content=b'{"base_url": "http://127.0.0.1:9001", "x": ' + deep(5000) + b"}",
        )
    )
    deep_def = json.dumps({**DEF, "description": "D"}).replace('"D"', "D").encode()
    add(
        Case(
            "deep-definition-body",
            "POST",
            "/v1/definitions",
            BAD,
            content=deep_def.replace(b"D", deep(5000)),
        )
    )
    add(Case("deep-root", "POST", "/v1/sagas", BAD, content=deep(5000)))
    add(
        Case(
            "deep-100-saga-input",
            "POST",
            "/v1/sagas",
            {422},
            content=b'{"definition": "flow", "input": ' + deep(100) + b"}",
        )
    )
    step_body = simple_definition("flow2", service="pay")
    step_body["steps"][0]["action"]["body"] = "B"
    add(
        Case(
            "deep-100-step-body",
            "POST",
            "/v1/definitions",
            {422},
            content=json.dumps(step_body).replace('"B"', deep(100).decode()).encode(),
        )
    )
    # --- invalid UTF-8 ---------------------------------------------------------------
    for name, raw in {
        "ff-fe": b'{"base_url": "http://127.0.0.1:9001/\xff\xfe"}',
        "lone-continuation": b'{"base_url": "http://\x80"}',
        "overlong": b'{"base_url": "http://\xc0\xaf"}',
        "truncated-sequence": b'{"base_url": "http://\xe2\x82"}',
    }.items():
        add(Case(f"utf8-service-{name}", "PUT", "/v1/services/pay", {400}, content=raw))
    add(
        Case(
            "utf8-saga",
            "POST",
            "/v1/sagas",
            {400},
            content=b'{"definition": "flow", "input": {"x": "\xff"}}',
        )
    )
    add(
        Case(
            "utf8-definition",
            "POST",
            "/v1/definitions",
            {400},
            content=b'{"name": "fl\xffow", "steps": []}',
        )
    )
    # --- bad UUIDs -------------------------------------------------------------------
    for bad in [
        "not-a-uuid",
        "123",
        ZERO_UUID[:-1] + "g",
        ZERO_UUID + "0",
        "%00",
        "'%20OR%201=1--",
        "x" * 1000,
        "-1",
    ]:
        add(Case(f"uuid-get-{bad[:12]}", "GET", f"/v1/sagas/{bad}", {422}))
        add(Case(f"uuid-events-{bad[:12]}", "GET", f"/v1/sagas/{bad}/events", {422}))
        add(Case(f"uuid-cancel-{bad[:12]}", "POST", f"/v1/sagas/{bad}/cancel", {422}))
    add(Case("uuid-unknown-get", "GET", f"/v1/sagas/{ZERO_UUID}", {404}))
    add(Case("uuid-unknown-events", "GET", f"/v1/sagas/{ZERO_UUID}/events", {404}))
    add(Case("uuid-unknown-cancel", "POST", f"/v1/sagas/{ZERO_UUID}/cancel", {404}))
    add(
        Case(
            "uuid-unknown-wait",
            "GET",
            f"/v1/sagas/{ZERO_UUID}",
            {404},
            params={"wait_seconds": 0.2},
        )
    )
    # --- limit -------------------------------------------------------------------------
    lists = ["/v1/services", "/v1/definitions", "/v1/sagas", "/v1/sagas/{saga}/events"]
    for path in lists:
        for bad in ["-1", "0", "501", "99999999999999999999999", "abc", "", "1.5", "1e3", "NaN"]:
            add(Case(f"limit-{path}-{bad}", "GET", path, {422}, params={"limit": bad}))
    # --- cursor ------------------------------------------------------------------------
    garbage = [
        "garbage!!",
        "%%%",
        "a" * 600,
        "====",
        cursor_of(123),
        cursor_of([1, 2]),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
        cursor_of({"a": 1}),
    ]
    for path in ["/v1/services", "/v1/definitions"]:
        for i, bad in enumerate(garbage):
            add(Case(f"cursor-{path}-{i}", "GET", path, BAD, params={"cursor": bad}))
        add(Case(f"cursor-{path}-nul", "GET", path, BAD, params={"cursor": cursor_of("a\u0000")}))
        add(
            Case(
                f"cursor-{path}-surrogate", "GET", path, BAD, params={"cursor": cursor_of("\ud800")}
            )
        )
    saga_cursors = [
        *garbage,
        cursor_of(["x"]),
        cursor_of([None, None]),
        cursor_of("abcdef"),
        cursor_of(["2024-01-01T00:00:00+00:00", "not-a-uuid"]),
        cursor_of(["not-a-date", ZERO_UUID]),
        cursor_of([{}, []]),
    ]
    for i, bad in enumerate(saga_cursors):
        add(Case(f"cursor-sagas-{i}", "GET", "/v1/sagas", BAD, params={"cursor": bad}))
    not_int = [g for g in garbage if g != cursor_of(123)]  # an int is an events cursor
    for i, bad in enumerate(not_int):
        path = "/v1/sagas/{saga}/events"
        add(Case(f"cursor-events-{i}", "GET", path, BAD, params={"cursor": bad}))
    events_cursors = {
        "string": (cursor_of("x"), BAD),
        "float": (cursor_of(1.5), BAD),
        "bool": (cursor_of(True), BAD),
        # Out of bigint range: refused, or read as "past the end"; never a 5xx.
        "huge": (cursor_of(10**30), BAD | {200}),
        "huge-negative": (cursor_of(-(10**30)), BAD | {200}),
    }
    for name, (bad, expect) in events_cursors.items():
        add(
            Case(
                f"cursor-events-{name}",
                "GET",
                "/v1/sagas/{saga}/events",
                expect,
                params={"cursor": bad},
            )
        )
    add(Case("sagas-status-bogus", "GET", "/v1/sagas", {422}, params={"status": "bogus"}))
    add(Case("sagas-definition-bad", "GET", "/v1/sagas", {422}, params={"definition": "Bad!"}))
    add(Case("sagas-definition-nul", "GET", "/v1/sagas", {422}, params={"definition": "a\u0000"}))
    # --- wait_seconds ------------------------------------------------------------------
    for bad in ["-1", "31", "abc", "nan", "inf", "-inf", "1e309", ""]:
        add(Case(f"wait-{bad}", "GET", "/v1/sagas/{saga}", {422}, params={"wait_seconds": bad}))
    # --- content types -----------------------------------------------------------------
    for ctype in ["text/plain", "application/x-www-form-urlencoded", "application/xml"]:
        body = json.dumps(service_doc()).encode()
        hdr = {"content-type": ctype}
        add(
            Case(
                f"ctype-service-{ctype}",
                "PUT",
                "/v1/services/pay",
                {400, 415, 422},
                content=body,
                headers=hdr,
            )
        )
        add(
            Case(
                f"ctype-definition-{ctype}",
                "POST",
                "/v1/definitions",
                {400, 415, 422},
                content=json.dumps(DEF).encode(),
                headers=hdr,
            )
        )
        add(
            Case(
                f"ctype-saga-{ctype}",
                "POST",
                "/v1/sagas",
                {400, 415, 422},
                content=b'{"definition": "flow"}',
                headers=hdr,
            )
        )
    # --- long and unicode names --------------------------------------------------------
    long = "a" * 1000
    add(Case("long-service-put", "PUT", f"/v1/services/{long}", {422}, json=service_doc()))
    add(Case("long-service-get", "GET", f"/v1/services/{long}", {404, 422}))
    add(Case("long-definition-get", "GET", f"/v1/definitions/{long}", {404, 422}))
    add(Case("long-definition-version", "GET", f"/v1/definitions/{long}/versions/1", {404, 422}))
    add(Case("long-definition-post", "POST", "/v1/definitions", {422}, json={**DEF, "name": long}))
    long_step = simple_definition("flow2", service="pay")
    long_step["steps"][0]["name"] = long
    add(Case("long-step-name", "POST", "/v1/definitions", {422}, json=long_step))
    add(Case("long-saga-definition", "POST", "/v1/sagas", {422}, json={"definition": long}))
    add(
        Case(
            "long-description",
            "POST",
            "/v1/definitions",
            {422},
            json={**DEF, "description": "d" * 5000},
        )
    )
    add(
        Case(
            "long-idempotency-key",
            "POST",
            "/v1/sagas",
            {422},
            json={"definition": "flow"},
            headers={"Idempotency-Key": "k" * 256},
        )
    )
    add(
        Case(
            "long-base-url",
            "PUT",
            "/v1/services/pay",
            {422},
            json=service_doc("http://127.0.0.1:9001/" + "p" * 3000),
        )
    )
    for uname in ["café", "データ", "pay💳", "ǅemo"]:
        quoted = httpx.URL("http://x/" + uname).raw_path.decode().lstrip("/")
        add(
            Case(
                f"unicode-service-put-{uname}",
                "PUT",
                f"/v1/services/{quoted}",
                {422},
                json=service_doc(),
            )
        )
        add(Case(f"unicode-service-get-{uname}", "GET", f"/v1/services/{quoted}", {404, 422}))
        add(
            Case(
                f"unicode-definition-{uname}",
                "POST",
                "/v1/definitions",
                {422},
                json={**DEF, "name": uname},
            )
        )
        uni_step = simple_definition("flow2", service="pay")
        uni_step["steps"][1]["name"] = uname
        add(Case(f"unicode-step-{uname}", "POST", "/v1/definitions", {422}, json=uni_step))
        add(Case(f"unicode-saga-{uname}", "POST", "/v1/sagas", {422}, json={"definition": uname}))
    # --- methods and paths -------------------------------------------------------------
    add(Case("delete-service", "DELETE", "/v1/services/pay", {405}))
    add(Case("post-service", "POST", "/v1/services/pay", {405}, json=service_doc()))
    add(Case("post-services", "POST", "/v1/services", {405}, json=service_doc()))
    add(Case("delete-definition", "DELETE", "/v1/definitions/flow", {405}))
    add(Case("put-definitions", "PUT", "/v1/definitions", {405}, json=DEF))
    add(Case("delete-saga", "DELETE", "/v1/sagas/{saga}", {405}))
    add(Case("get-cancel", "GET", "/v1/sagas/{saga}/cancel", {405}))
    add(Case("unknown-path", "GET", "/v1/nothing-here", {404}))
    add(Case("unknown-root", "GET", "/nothing-here", {404}))
    return cases


CASES = _cases()


@dataclass
class Seed:
    client: httpx.AsyncClient
    saga_id: str
    snapshot: dict[str, Any]


SNAPSHOT_PATHS = [
    "/v1/services/pay",
    "/v1/services",
    "/v1/definitions/flow",
    "/v1/definitions/flow/versions/1",
    "/v1/definitions",
    "/v1/sagas/{saga}",
    "/v1/sagas",
    "/v1/sagas/{saga}/events",
]


async def _snapshot(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    out = {}
    for path in SNAPSHOT_PATHS:
        r = await client.get(path.format(saga=saga_id))
        assert r.status_code == 200, (path, r.text)
        out[path] = r.json()
    return out


async def _seed_data(client: httpx.AsyncClient) -> str:
    r = await client.put(
        "/v1/services/pay",
        json=service_doc(headers={"X-Api-Key": "secret"}, max_concurrency=7),
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/definitions", json=simple_definition("flow", description="café ☕ 日本")
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/sagas",
        json={"definition": "flow", "input": {"x": "ünïcödé ✓", "n": [1, 2.5, None, True]}},
        headers={"Idempotency-Key": "seed-key"},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
async def seed(pg_url: str, template_db: str) -> AsyncIterator[Seed]:
    """One server and database for the whole battery (nothing in it may change them)."""
    name = pg.clone(pg_url, template_db)
    try:
        async with client_for(make_settings(), pg.with_database(pg_url, name)) as client:
            saga_id = await _seed_data(client)
            yield Seed(client, saga_id, await _snapshot(client, saga_id))
    finally:
        pg.drop(pg_url, name)


@pytest.fixture
async def fresh(api: httpx.AsyncClient) -> Seed:
    """Seeded data on a server of its own, for tests that add data."""
    saga_id = await _seed_data(api)
    return Seed(api, saga_id, await _snapshot(api, saga_id))


async def _send(seed: Seed, case: Case) -> httpx.Response:
    path = case.path.replace("{saga}", seed.saga_id)
    return await seed.client.request(case.method, path, **case.kwargs())


async def _still_healthy(seed: Seed) -> None:
    r = await seed.client.get("/healthz")
    assert r.status_code == 200, r.text
    assert await _snapshot(seed.client, seed.saga_id) == seed.snapshot


def _check(case: Case, r: httpx.Response) -> None:
    assert r.status_code < 500, f"{case.id}: {r.status_code} {r.text}"
    assert r.status_code in case.expect, f"{case.id}: {r.status_code} {r.text}"
    assert r.headers.get("x-request-id"), case.id
    if r.status_code >= 400:
        assert_problem(r)
        assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input(seed: Seed, case: Case) -> None:
    r = await _send(seed, case)
    _check(case, r)
    await _still_healthy(seed)


async def test_whole_battery_in_one_process(seed: Seed) -> None:
    """All of it against one server: no failure leaks into the next (pool, state)."""
    failures = []
    for case in CASES:
        r = await _send(seed, case)
        try:
            _check(case, r)
        except AssertionError as exc:
            failures.append(str(exc).splitlines()[0][:300])
    assert not failures, "\n".join(failures)
    await _still_healthy(seed)


async def test_unicode_values_round_trip(seed: Seed) -> None:
    definition = seed.snapshot["/v1/definitions/flow"]
    assert definition["description"] == "café ☕ 日本"
    saga = seed.snapshot["/v1/sagas/{saga}"]
    assert saga["input"] == {"x": "ünïcödé ✓", "n": [1, 2.5, None, True]}


async def test_method_not_allowed_is_problem(seed: Seed) -> None:
    r = await seed.client.delete("/v1/services/pay")
    problem = assert_problem(r, 405)
    assert problem["title"]
    assert "PUT" in r.headers.get("allow", "") or "GET" in r.headers.get("allow", "")
    await _still_healthy(seed)


# --- oversize bodies -----------------------------------------------------------------


async def test_two_mib_body_with_content_length_is_413(seed: Seed) -> None:
    body = b'{"base_url": "http://127.0.0.1:9001/' + b"a" * (2 * 1024 * 1024) + b'"}'
    r = await seed.client.put(
        "/v1/services/pay", content=body, headers={**JSON_HEADERS, "X-Request-ID": "big-1"}
    )
    problem = assert_problem(r, 413)
    assert "limit" in problem["detail"]
    assert r.headers["x-request-id"] == "big-1"
    await _still_healthy(seed)


@pytest.mark.parametrize(
    "path,method", [("/v1/sagas", "POST"), ("/v1/definitions", "POST"), ("/v1/services/pay", "PUT")]
)
async def test_chunked_body_over_limit_is_413(seed: Seed, path: str, method: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"definition": "flow", "input": {"pad": "'
        for _ in range(24):  # 24 x 64 KiB = 1.5 MiB
            yield b"x" * 65536
        yield b'"}}'

    r = await seed.client.request(
        method, path, content=chunks(), headers={**JSON_HEADERS, "X-Request-ID": "chunky"}
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(r, 413)
    assert r.headers["x-request-id"] == "chunky"
    await _still_healthy(seed)


async def test_body_just_under_limit_is_not_413(fresh: Seed) -> None:
    pad = "x" * (1024 * 1024 - 100)
    r = await fresh.client.post("/v1/sagas", json={"definition": "flow", "input": {"pad": pad}})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["input"]["pad"] == pad


# --- request ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("GET", "/healthz", {}),
        ("GET", "/readyz", {}),
        ("GET", "/v1/services/pay", {}),
        ("GET", "/v1/services/nobody", {}),
        ("PUT", "/v1/services/pay", {"json": {"base_url": "ftp://x"}}),
        ("POST", "/v1/sagas", {"content": b"{bad", "headers": JSON_HEADERS}),
        ("DELETE", "/v1/services/pay", {}),
        ("GET", "/no/such/path", {}),
        ("GET", "/openapi.json", {}),
    ],
)
async def test_request_id_is_echoed(
    seed: Seed, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    rid = "req-0123456789abcdef_X.y:z"
    headers = {**kwargs.pop("headers", {}), "X-Request-ID": rid}
    r = await seed.client.request(method, path, headers=headers, **kwargs)
    assert r.status_code < 500, r.text
    assert r.headers.get_list("x-request-id") == [rid]

    r = await seed.client.request(
        method,
        path,
        headers=headers and {k: v for k, v in headers.items() if k != "X-Request-ID"},
        **kwargs,
    )
    generated = r.headers.get_list("x-request-id")
    assert len(generated) == 1 and generated[0] and generated[0] != rid


async def test_request_ids_are_fresh_per_request(seed: Seed) -> None:
    ids = {(await seed.client.get("/healthz")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_insane_request_id_is_replaced(seed: Seed) -> None:
    for bad in ["x" * 500, "has space", "tab\there"]:
        r = await seed.client.get("/healthz", headers={"X-Request-ID": bad})
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert rid and rid != bad and len(rid) <= 128


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_wrong_content_type_says_what_to_fix(fresh: Seed, ctype: str | None) -> None:
    """Contract §2: bad input gets a message that says what to fix (here: the Content-Type)."""
    body = json.dumps(service_doc()).encode()
    headers = {"content-type": ctype} if ctype else {}
    r = await fresh.client.put("/v1/services/other", content=body, headers=headers)
    if ctype is None and r.status_code == 201:
        return  # reading a body without Content-Type as JSON is fine too
    problem = assert_problem(r)
    assert r.status_code in (400, 415, 422), r.text
    assert "content-type" in json.dumps(problem).lower(), problem
