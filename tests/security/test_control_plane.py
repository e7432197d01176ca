"""The control plane: with SAGA_API_TOKEN set, the API token may start, read and cancel
sagas and read services and definitions, but registering needs the admin token (403),
on every registration route, decided before the body is read; every registration is
audited with who did it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.api.auth import ANONYMOUS, Tokens
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.api_helpers import assert_problem, client_for, service_doc, simple_definition

API_TOKEN = "api-token-for-control-plane-tests"
REGISTRATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("PUT", "/v1/services/pay", {"json": service_doc()}),
    ("POST", "/v1/definitions", {"json": simple_definition("flow")}),
    ("POST", "/v1/definitions/", {"json": simple_definition("flow")}),
]
READS = ["/v1/services", "/v1/services/pay", "/v1/definitions", "/v1/definitions/flow"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def locked(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_settings(SAGA_API_TOKEN=API_TOKEN), db_url) as client:
        r = await client.put("/v1/services/pay", json=service_doc(), headers=bearer(ADMIN_TOKEN))
        assert r.status_code == 201, r.text
        yield client


@pytest.mark.parametrize(
    ("method", "path", "kwargs"), REGISTRATIONS, ids=[f"{m} {p}" for m, p, _ in REGISTRATIONS]
)
@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("wrong-token", 401), (API_TOKEN, 403), (ADMIN_TOKEN, None)],
    ids=["none", "wrong", "api", "admin"],
)
async def test_registration_routes(
    locked: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    token: str | None,
    status: int | None,
) -> None:
    headers = bearer(token) if token else {}
    r = await locked.request(method, path, headers=headers, **kwargs)
    if status is None:
        assert r.status_code < 300 or r.status_code == 307, r.text
    else:
        assert_problem(r, status)


async def test_the_api_token_reads_what_it_may_not_change(locked: httpx.AsyncClient) -> None:
    r = await locked.post(
        "/v1/definitions", json=simple_definition("flow"), headers=bearer(ADMIN_TOKEN)
    )
    assert r.status_code == 201
    for path in READS:
        assert (await locked.get(path, headers=bearer(API_TOKEN))).status_code == 200, path
    # Nothing the API token tried was stored or audited.
    await locked.put(
        "/v1/services/pay", json=service_doc("http://127.0.0.1:1"), headers=bearer(API_TOKEN)
    )
    service = (await locked.get("/v1/services/pay", headers=bearer(API_TOKEN))).json()
    assert service["base_url"] == "http://127.0.0.1:9001"
    audit = (await locked.get("/v1/admin/audit", headers=bearer(ADMIN_TOKEN))).json()["items"]
    assert {e["actor"] for e in audit} == {Tokens.token_id(ADMIN_TOKEN)}
    assert sorted(e["action"] for e in audit) == ["definition.register", "service.register"]


async def test_an_open_api_audits_registrations_as_anonymous(api: httpx.AsyncClient) -> None:
    assert (await api.put("/v1/services/pay", json=service_doc())).status_code == 201
    audit = (await api.get("/v1/admin/audit", headers=bearer(ADMIN_TOKEN))).json()["items"]
    assert [(e["actor"], e["action"], e["target"]) for e in audit] == [
        (ANONYMOUS, "service.register", "pay")
    ]
