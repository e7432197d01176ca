"""`PUT/GET /v1/services…`: create/replace, listing, secrets, live state, validation."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import make_settings
from tests.support.api_helpers import assert_problem, client_for, has_loc, service_doc

SECRET_KEY = "sk-live-5f1e2d3c4b5a69788796a5b4c3d2e1f0"
SECRET_AUTH = "Bearer eyJhbGciOiJIUzI1NiJ9.very-secret-payload"


async def test_put_creates_then_replaces(api: httpx.AsyncClient) -> None:
    r = await api.put(
        "/v1/services/payments",
        json=service_doc("http://127.0.0.1:9001", timeout_seconds=5, max_concurrency=20),
    )
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["name"] == "payments"
    assert first["base_url"] == "http://127.0.0.1:9001"
    assert first["timeout_seconds"] == 5
    assert first["max_concurrency"] == 20
    assert first["circuit_breaker"] == {
        "failure_threshold": 5,
        "recovery_timeout_seconds": 30,
        "half_open_max_calls": 1,
    }

    r = await api.put(
        "/v1/services/payments",
        json=service_doc(
            "https://payments.internal:8443/",
            timeout_seconds=2.5,
            max_concurrency=3,
            circuit_breaker={
                "failure_threshold": 2,
                "recovery_timeout_seconds": 1.5,
                "half_open_max_calls": 2,
            },
        ),
    )
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["base_url"] == "https://payments.internal:8443"
    assert second["timeout_seconds"] == 2.5
    assert second["max_concurrency"] == 3
    assert second["circuit_breaker"] == {
        "failure_threshold": 2,
        "recovery_timeout_seconds": 1.5,
        "half_open_max_calls": 2,
    }
    assert second["created_at"] == first["created_at"]

    r = await api.get("/v1/services/payments")
    assert r.status_code == 200, r.text
    got = r.json()
    for key in ("base_url", "timeout_seconds", "max_concurrency", "circuit_breaker"):
        assert got[key] == second[key]

    r = await api.get("/v1/services")
    assert r.status_code == 200
    assert [s["name"] for s in r.json()["items"]] == ["payments"]


async def test_get_one_and_list(api: httpx.AsyncClient) -> None:
    for name in ("orders", "billing", "stock"):
        r = await api.put(f"/v1/services/{name}", json=service_doc(f"http://{name}.local:80"))
        assert r.status_code == 201, r.text

    r = await api.get("/v1/services/billing")
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "billing"
    assert r.json()["base_url"] == "http://billing.local:80"

    r = await api.get("/v1/services")
    assert r.status_code == 200, r.text
    page = r.json()
    assert set(page) == {"items", "next_cursor"}
    assert [s["name"] for s in page["items"]] == ["billing", "orders", "stock"]
    assert page["next_cursor"] is None


@pytest.mark.parametrize("count,limit", [(7, 3), (6, 2), (5, 1), (4, 500)])
async def test_list_pagination_walks_all_pages(
    api: httpx.AsyncClient, count: int, limit: int
) -> None:
    names = [f"svc-{i:02d}" for i in range(count)]
    for name in reversed(names):
        r = await api.put(f"/v1/services/{name}", json=service_doc())
        assert r.status_code == 201, r.text

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.get("/v1/services", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        seen.extend(s["name"] for s in page["items"])
        pages += 1
        assert pages <= count + 2, "pagination does not terminate"
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor
    assert seen == names  # every service once, in name order, no repeats
    assert len(set(seen)) == len(seen)


async def test_default_limit_is_50(api: httpx.AsyncClient) -> None:
    for i in range(52):
        r = await api.put(f"/v1/services/s{i:03d}", json=service_doc())
        assert r.status_code == 201, r.text
    r = await api.get("/v1/services")
    page = r.json()
    assert len(page["items"]) == 50
    assert page["next_cursor"]
    r = await api.get("/v1/services", params={"cursor": page["next_cursor"]})
    assert [s["name"] for s in r.json()["items"]] == ["s050", "s051"]


async def test_secret_header_values_never_echoed(api: httpx.AsyncClient) -> None:
    doc = service_doc(headers={"X-Api-Key": SECRET_KEY, "Authorization": SECRET_AUTH})
    r = await api.put("/v1/services/secretive", json=doc)
    assert r.status_code == 201, r.text
    responses = [r]
    # Replace too: the 200 answer must not echo either.
    r = await api.put("/v1/services/secretive", json=doc)
    assert r.status_code == 200, r.text
    responses.append(r)
    responses.append(await api.get("/v1/services/secretive"))
    responses.append(await api.get("/v1/services"))
    responses.append(await api.get("/v1/services", params={"limit": 1}))
    for resp in responses:
        assert resp.status_code in (200, 201), resp.text
        assert SECRET_KEY not in resp.text
        assert "very-secret-payload" not in resp.text
        assert "sk-live" not in resp.text

    got = responses[2].json()
    # Header names are shown (so users can see what is configured), values are not.
    assert {k.lower() for k in got["headers"]} == {"x-api-key", "authorization"}


async def test_live_state_fields(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/services/live", json=service_doc())
    assert r.status_code == 201, r.text
    for body in (r.json(), (await api.get("/v1/services/live")).json()):
        assert body["circuit_state"] == "closed"
        assert body["in_flight"] == 0
        assert body["consecutive_failures"] == 0
    (item,) = (await api.get("/v1/services")).json()["items"]
    assert item["circuit_state"] == "closed"
    assert item["in_flight"] == 0
    assert item["consecutive_failures"] == 0


@pytest.mark.parametrize(
    "name",
    [
        "Payments",
        "1payments",
        "pay.ments",
        "_pay",
        "pay ments",
        "a" * 65,
        "pay%24",
    ],
)
async def test_bad_name_in_path(api: httpx.AsyncClient, name: str) -> None:
    r = await api.put(f"/v1/services/{name}", json=service_doc())
    problem = assert_problem(r, 422)
    assert has_loc(problem, "path", "name"), problem
    assert (await api.get("/v1/services")).json()["items"] == []


BAD_BODIES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("ftp", service_doc("ftp://files.example.com/"), ("body", "base_url")),
    ("javascript", service_doc("javascript:alert(1)"), ("body", "base_url")),
    ("no-scheme", service_doc("127.0.0.1:9001"), ("body", "base_url")),
    ("no-scheme-host", service_doc("payments.local/api"), ("body", "base_url")),
    ("file", service_doc("file:///etc/passwd"), ("body", "base_url")),
    ("no-host", service_doc("http://"), ("body", "base_url")),
    ("credentials", service_doc("http://user:pass@127.0.0.1:9001"), ("body", "base_url")),
    ("user-only", service_doc("https://token@127.0.0.1:9001"), ("body", "base_url")),
    ("bad-port", service_doc("http://127.0.0.1:99999"), ("body", "base_url")),
    ("timeout-zero", service_doc(timeout_seconds=0), ("body", "timeout_seconds")),
    ("timeout-negative", service_doc(timeout_seconds=-1), ("body", "timeout_seconds")),
    ("concurrency-zero", service_doc(max_concurrency=0), ("body", "max_concurrency")),
    ("unknown-field", service_doc(retries=3), ("body", "retries")),
    (
        "unknown-breaker-field",
        service_doc(circuit_breaker={"threshold": 3}),
        ("body", "circuit_breaker", "threshold"),
    ),
    (
        "breaker-threshold-zero",
        service_doc(circuit_breaker={"failure_threshold": 0}),
        ("body", "circuit_breaker", "failure_threshold"),
    ),
    (
        "reserved-header",
        service_doc(headers={"Idempotency-Key": "fixed"}),
        ("body", "headers"),
    ),
    (
        "reserved-header-lowercase",
        service_doc(headers={"x-saga-id": "fixed"}),
        ("body", "headers"),
    ),
    ("bad-header-name", service_doc(headers={"Bad Header": "v"}), ("body", "headers")),
    ("header-crlf", service_doc(headers={"X-Ok": "a\r\nX-Evil: 1"}), ("body", "headers")),
    ("missing-base-url", {"timeout_seconds": 3}, ("body", "base_url")),
]


@pytest.mark.parametrize(
    "doc,loc", [(d, loc) for _, d, loc in BAD_BODIES], ids=[i for i, _, _ in BAD_BODIES]
)
async def test_validation_problem(
    api: httpx.AsyncClient, doc: dict[str, Any], loc: tuple[str, ...]
) -> None:
    r = await api.put("/v1/services/payments", json=doc)
    problem = assert_problem(r, 422)
    assert has_loc(problem, *loc), problem
    for err in problem["errors"]:
        assert set(err) >= {"loc", "msg", "type"}
    # Nothing was stored.
    assert_problem(await api.get("/v1/services/payments"), 404)


async def test_rejected_replace_keeps_the_old_service(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/services/keep", json=service_doc("http://keep.local", max_concurrency=4))
    assert r.status_code == 201
    before = r.json()
    r = await api.put("/v1/services/keep", json=service_doc("ftp://keep.local"))
    assert_problem(r, 422)
    after = (await api.get("/v1/services/keep")).json()
    assert after["base_url"] == before["base_url"]
    assert after["max_concurrency"] == 4
    assert after["updated_at"] == before["updated_at"]


async def test_host_refused_by_allowed_hosts(db_url: str) -> None:
    settings = make_settings(SAGA_ALLOWED_HOSTS="10.0.0.1")
    async with client_for(settings, db_url) as client:
        r = await client.put("/v1/services/evil", json=service_doc("http://169.254.169.254"))
        problem = assert_problem(r, 422)
        assert has_loc(problem, "body", "base_url"), problem
        assert_problem(await client.get("/v1/services/evil"), 404)

        r = await client.put("/v1/services/good", json=service_doc("http://10.0.0.1:8080"))
        assert r.status_code == 201, r.text


async def test_allowed_hosts_with_port_pattern(db_url: str) -> None:
    settings = make_settings(SAGA_ALLOWED_HOSTS="127.0.0.1:9001,*.internal")
    async with client_for(settings, db_url) as client:
        ok = await client.put("/v1/services/a", json=service_doc("http://127.0.0.1:9001"))
        assert ok.status_code == 201, ok.text
        ok = await client.put("/v1/services/b", json=service_doc("https://pay.internal"))
        assert ok.status_code == 201, ok.text
        bad = await client.put("/v1/services/c", json=service_doc("http://127.0.0.1:9002"))
        assert_problem(bad, 422)
        bad = await client.put("/v1/services/d", json=service_doc("http://internal.evil.com"))
        assert_problem(bad, 422)


async def test_get_unknown_service_is_404_problem(api: httpx.AsyncClient) -> None:
    problem = assert_problem(await api.get("/v1/services/nobody"), 404)
    assert "nobody" in problem["detail"]


async def test_secret_values_not_echoed_in_errors(api: httpx.AsyncClient) -> None:
    """A refused document's header values do not come back in the problem either."""
    for headers in (
        {"Idempotency-Key": SECRET_KEY},
        {"X-Api-Key": SECRET_KEY + "\r\n"},
        {"Bad Name": SECRET_KEY},
        {"X-Api-Key": SECRET_KEY, "X-Saga-Id": SECRET_KEY},
    ):
        r = await api.put("/v1/services/leaky", json=service_doc(headers=headers))
        assert_problem(r, 422)
        assert SECRET_KEY not in r.text
    r = await api.put(
        "/v1/services/leaky", json=service_doc(headers={"X-Api-Key": SECRET_KEY}, bogus=1)
    )
    assert_problem(r, 422)
    assert SECRET_KEY not in r.text
