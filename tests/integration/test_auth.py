"""Bearer tokens: /v1/ is open without SAGA_API_TOKEN, closed with it; health is always open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.api.auth import Tokens
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.api_helpers import assert_problem, client_for, service_doc, simple_definition

API_TOKEN = "api-token-7c1f0e"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"

# Every /v1 route, with a body that would be valid (so only auth can refuse it).
V1_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/v1/services", {}),
    ("GET", "/v1/services/pay", {}),
    ("PUT", "/v1/services/pay", {"json": service_doc()}),
    ("GET", "/v1/definitions", {}),
    ("GET", "/v1/definitions/flow", {}),
    ("GET", "/v1/definitions/flow/versions/1", {}),
    ("POST", "/v1/definitions", {"json": simple_definition("flow")}),
    ("GET", "/v1/sagas", {}),
    ("POST", "/v1/sagas", {"json": {"definition": "flow"}}),
    ("GET", f"/v1/sagas/{ZERO_UUID}", {}),
    ("GET", f"/v1/sagas/{ZERO_UUID}/events", {}),
    ("POST", f"/v1/sagas/{ZERO_UUID}/cancel", {}),
]
CALL_IDS = [f"{m} {p}" for m, p, _ in V1_CALLS]


@pytest.fixture
async def locked(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The API with SAGA_API_TOKEN set; the client sends no token by itself."""
    async with client_for(make_settings(SAGA_API_TOKEN=API_TOKEN), db_url) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_open_without_api_token(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/services")
    assert r.status_code == 200, r.text
    r = await api.put("/v1/services/pay", json=service_doc())
    assert r.status_code == 201, r.text
    r = await api.post("/v1/definitions", json=simple_definition("flow"))
    assert r.status_code == 201, r.text
    r = await api.post("/v1/sagas", json={"definition": "flow"})
    assert r.status_code == 201, r.text
    # A stray (even wrong) token does no harm while the API is open.
    r = await api.get("/v1/services", headers=bearer("whatever"))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method,path,kwargs", V1_CALLS, ids=CALL_IDS)
async def test_no_token_is_401(
    locked: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    r = await locked.request(method, path, **kwargs)
    problem = assert_problem(r, 401)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), r.headers
    assert r.headers.get("x-request-id")
    assert "Bearer" in problem["detail"] or "token" in problem["detail"]


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {API_TOKEN}x",
        f"Bearer x{API_TOKEN}",
        f"Bearer {API_TOKEN[:-1]}",
        "Bearer wrong",
        f"Bearer {API_TOKEN.upper()}",
        f"Basic {API_TOKEN}",
        f"Token {API_TOKEN}",
        API_TOKEN,
        "Bearer",
        "",
    ],
)
async def test_wrong_token_is_401(locked: httpx.AsyncClient, header: str) -> None:
    r = await locked.get("/v1/services", headers={"Authorization": header})
    assert_problem(r, 401)
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert API_TOKEN not in r.text
    r = await locked.put("/v1/services/pay", json=service_doc(), headers={"Authorization": header})
    assert_problem(r, 401)


@pytest.mark.parametrize("token", [API_TOKEN, ADMIN_TOKEN], ids=["api-token", "admin-token"])
async def test_right_token_opens_v1(locked: httpx.AsyncClient, token: str) -> None:
    admin = bearer(ADMIN_TOKEN)
    r = await locked.put("/v1/services/pay", json=service_doc(), headers=admin)
    assert r.status_code == 201, r.text
    r = await locked.post("/v1/definitions", json=simple_definition("flow"), headers=admin)
    assert r.status_code == 201, r.text
    h = bearer(token)
    r = await locked.get("/v1/services", headers=h)
    assert r.status_code == 200, r.text
    r = await locked.get("/v1/services/pay", headers=h)
    assert r.status_code == 200, r.text
    r = await locked.get("/v1/definitions/flow", headers=h)
    assert r.status_code == 200, r.text
    r = await locked.post("/v1/sagas", json={"definition": "flow"}, headers=h)
    assert r.status_code == 201, r.text
    saga_id = r.json()["id"]
    r = await locked.get(f"/v1/sagas/{saga_id}", headers=h)
    assert r.status_code == 200, r.text
    r = await locked.get(f"/v1/sagas/{saga_id}/events", headers=h)
    assert r.status_code == 200, r.text
    # Scheme is case-insensitive (RFC 9110 §11.1).
    r = await locked.get("/v1/services", headers={"Authorization": f"bearer {token}"})
    assert r.status_code == 200, r.text


REGISTRATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("PUT", "/v1/services/pay", {"json": service_doc()}),
    ("PUT", "/v1/services/other", {"json": service_doc()}),
    ("POST", "/v1/definitions", {"json": simple_definition("flow")}),
]


@pytest.mark.parametrize("method,path,kwargs", REGISTRATIONS, ids=[p for _, p, _ in REGISTRATIONS])
async def test_registering_needs_the_admin_token_when_the_api_is_locked(
    locked: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    r = await locked.put("/v1/services/pay", json=service_doc(), headers=bearer(ADMIN_TOKEN))
    assert r.status_code in (200, 201), r.text
    r = await locked.request(method, path, headers=bearer(API_TOKEN), **kwargs)
    problem = assert_problem(r, 403)
    assert "admin token" in problem["detail"]
    # Decided before the body is read: even an invalid body answers 403, not 422.
    r = await locked.request(
        method,
        path,
        headers={**bearer(API_TOKEN), "content-type": "application/json"},
        content=b"{not json",
    )
    assert_problem(r, 403)
    r = await locked.request(method, path, headers=bearer(ADMIN_TOKEN), **kwargs)
    assert r.status_code in (200, 201), r.text


async def test_registrations_are_audited_without_secret_values(
    locked: httpx.AsyncClient,
) -> None:
    admin = bearer(ADMIN_TOKEN)
    doc = service_doc()
    doc["headers"] = {"X-Api-Key": "TOPSECRET-1"}
    r = await locked.put("/v1/services/pay", json=doc, headers=admin)
    assert r.status_code == 201, r.text
    doc["headers"] = {"X-Api-Key": "TOPSECRET-2", "X-Team": "TOPSECRET-3"}
    doc["timeout_seconds"] = 7
    r = await locked.put("/v1/services/pay", json=doc, headers=admin)
    assert r.status_code == 200, r.text
    for _ in range(2):
        r = await locked.post("/v1/definitions", json=simple_definition("flow"), headers=admin)
        assert r.status_code in (200, 201), r.text
    r = await locked.get("/v1/admin/audit", headers=admin)
    entries = list(reversed(r.json()["items"]))
    assert "TOPSECRET" not in r.text
    first, second, defined, again = entries
    actor = Tokens.token_id(ADMIN_TOKEN)
    assert {e["actor"] for e in entries} == {actor}
    assert first["action"] == "service.register" and first["details"]["created"] is True
    assert first["details"]["headers"] == {"added": ["x-api-key"], "removed": [], "changed": []}
    assert second["details"]["created"] is False
    assert second["details"]["changed"] == {"timeout_seconds": {"from": 10.0, "to": 7.0}}
    assert second["details"]["headers"] == {
        "added": ["x-team"],
        "removed": [],
        "changed": ["x-api-key"],
    }
    assert (defined["action"], defined["target"]) == ("definition.register", "flow")
    assert defined["details"]["created"] is True and defined["details"]["version"] == 1
    assert again["details"]["created"] is False and again["details"]["version"] == 1


async def test_unauthenticated_calls_change_nothing(locked: httpx.AsyncClient) -> None:
    r = await locked.put("/v1/services/pay", json=service_doc())
    assert_problem(r, 401)
    r = await locked.get("/v1/services", headers=bearer(API_TOKEN))
    assert r.json()["items"] == []


@pytest.mark.parametrize(
    "method,path,kwargs",
    [
        ("PUT", "/v1/services/pay", {"json": {"base_url": "ftp://x", "bogus": 1}}),
        ("PUT", "/v1/services/Bad!", {"json": service_doc()}),
        ("GET", "/v1/sagas/not-a-uuid", {}),
        ("GET", "/v1/services", {"params": {"limit": "0"}}),
        (
            "POST",
            "/v1/definitions",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
        ),
    ],
    ids=["invalid-fields", "invalid-path", "bad-uuid", "bad-limit", "malformed-json"],
)
async def test_auth_is_checked_before_input(
    locked: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    """Without a token, bad input is still a 401: nothing about the API is revealed."""
    r = await locked.request(method, path, **kwargs)
    assert_problem(r, 401)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_needs_no_token(locked: httpx.AsyncClient, path: str) -> None:
    r = await locked.get(path)
    assert r.status_code == 200, r.text
    r = await locked.get(path, headers=bearer("wrong"))
    assert r.status_code == 200, r.text


async def test_admin_endpoint_needs_the_admin_token(locked: httpx.AsyncClient) -> None:
    r = await locked.get("/v1/admin/dashboard")
    assert_problem(r, 401)
    r = await locked.get("/v1/admin/dashboard", headers=bearer(API_TOKEN))
    assert_problem(r, 403)
    r = await locked.get("/v1/admin/dashboard", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 200, r.text


async def test_admin_endpoint_closed_even_when_v1_is_open(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/admin/dashboard")
    assert_problem(r, 401)
    # A token that is no token of ours fails authentication (401), not authorisation.
    r = await api.get("/v1/admin/dashboard", headers=bearer("wrong"))
    assert_problem(r, 401)
    r = await api.get("/v1/admin/dashboard", headers=bearer(ADMIN_TOKEN))
    assert r.status_code == 200, r.text
