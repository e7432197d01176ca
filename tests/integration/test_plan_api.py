"""`GET /v1/definitions/{name}/plan` (and of one version), and the checklist's warnings
on `POST /v1/definitions`, against the real API and database."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import make_settings
from tests.support.api_helpers import assert_problem, client_for, service_doc

KINDS = ["http_4xx", "http_5xx", "timeout", "connection", "circuit_open", "deadline"]
RULES = [
    "timeouts_defined",
    "retries_controlled",
    "compensation_missing",
    "isolation",
    "fallback_or_noncritical",
    "deadline_reachable",
]
RETRY = {"max_attempts": 4, "initial_interval_seconds": 0.2, "max_interval_seconds": 10}


def checkout(**extra: Any) -> dict[str, Any]:
    return {
        "name": "checkout",
        "timeout_seconds": 300,
        "steps": [
            {
                "name": "charge_payment",
                "action": {"service": "payments", "path": "/charges"},
                "compensation": {"service": "payments", "path": "/refunds"},
                "timeout_seconds": 2,
                "retry": RETRY,
            },
            {
                "name": "create_order",
                "action": {"service": "orders", "path": "/orders"},
                "compensation": {"service": "orders", "path": "/orders/cancel"},
                "timeout_seconds": 2,
                "retry": RETRY,
            },
            {
                "name": "send_receipt",
                "critical": False,
                "timeout_seconds": 2,
                "action": {"service": "notifications", "path": "/emails"},
            },
        ],
        **extra,
    }


async def services(client: httpx.AsyncClient, **extra: Any) -> None:
    for name in ("payments", "orders", "notifications"):
        r = await client.put(f"/v1/services/{name}", json=service_doc(**extra))
        assert r.status_code in (200, 201), r.text


async def test_the_plan_of_the_latest_version(api: httpx.AsyncClient) -> None:
    await services(api)
    r = await api.post("/v1/definitions", json=checkout())
    assert r.status_code == 201, r.text
    assert r.json()["warnings"] == []

    r = await api.get("/v1/definitions/checkout/plan")
    assert r.status_code == 200, r.text
    plan = r.json()
    assert (plan["definition"], plan["version"]) == ("checkout", 1)
    assert [f["rule"] for f in plan["checklist"]] == RULES
    assert all(f["ok"] for f in plan["checklist"]), plan["checklist"]
    assert [s["name"] for s in plan["steps"]] == ["charge_payment", "create_order", "send_receipt"]
    order = plan["steps"][1]["failures"]
    assert list(order) == KINDS
    assert order["http_4xx"] == {
        "attempts": 1,
        "retry_window_seconds": [0.0, 0.0],
        "then": "compensate",
        "compensates": ["charge_payment"],
        "final_status": "compensated",
        "error_kind": "http_status",
        "note": None,
    }
    assert order["http_5xx"]["attempts"] == 4
    assert order["http_5xx"]["retry_window_seconds"] == [0.0, 1.4]
    assert order["http_5xx"]["compensates"] == ["create_order?", "charge_payment"]
    assert order["circuit_open"]["attempts"] == 0
    assert order["circuit_open"]["error_kind"] == "circuit_open"
    assert order["deadline"]["compensates"] == ["create_order?", "charge_payment"]
    receipt = plan["steps"][2]["failures"]
    assert {receipt[k]["then"] for k in KINDS[:4]} == {"continue"}
    assert {receipt[k]["final_status"] for k in KINDS[:4]} == {"completed"}


async def test_the_plan_of_each_version(api: httpx.AsyncClient) -> None:
    await services(api)
    assert (await api.post("/v1/definitions", json=checkout())).status_code == 201
    no_deadline = checkout(timeout_seconds=None)
    assert (await api.post("/v1/definitions", json=no_deadline)).status_code == 201

    v1 = (await api.get("/v1/definitions/checkout/versions/1/plan")).json()
    v2 = (await api.get("/v1/definitions/checkout/versions/2/plan")).json()
    latest = (await api.get("/v1/definitions/checkout/plan")).json()
    assert (v1["version"], v2["version"]) == (1, 2)
    assert latest == v2
    assert v1["steps"][0]["failures"]["deadline"] is not None
    assert v2["steps"][0]["failures"]["deadline"] is None  # no timeout_seconds: no deadline
    # Without a deadline nothing ends the wait for an open circuit.
    assert v2["steps"][1]["failures"]["circuit_open"]["then"] == "wait"
    assert v2["steps"][1]["failures"]["circuit_open"]["final_status"] == "running"


async def test_unknown_definitions_and_versions(api: httpx.AsyncClient) -> None:
    await services(api)
    assert (await api.post("/v1/definitions", json=checkout())).status_code == 201
    assert_problem(await api.get("/v1/definitions/nothing/plan"), 404)
    problem = assert_problem(await api.get("/v1/definitions/checkout/versions/7/plan"), 404)
    assert "7" in problem["detail"]
    assert_problem(await api.get("/v1/definitions/Not-A-Name/plan"), 422)
    assert_problem(await api.get("/v1/definitions/checkout/versions/0/plan"), 422)


async def test_the_plan_uses_the_services_as_registered(api: httpx.AsyncClient) -> None:
    """A step without its own timeout takes its service's, and the plan follows the
    services as they are registered now."""
    doc = checkout(timeout_seconds=10)
    for s in doc["steps"]:
        del s["timeout_seconds"]
        s["retry"] = {**RETRY, "jitter": False}
    await services(api, timeout_seconds=4)
    r = await api.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text
    timeout = (await api.get("/v1/definitions/checkout/plan")).json()["steps"][1]["failures"][
        "timeout"
    ]
    # Attempts end at 4, 8.2 and 12.6 s: the third starts before the deadline, none after.
    assert timeout["attempts"] == 3
    assert timeout["error_kind"] == "deadline"
    assert {w["rule"] for w in r.json()["warnings"]} >= {
        "timeouts_defined",
        "retries_controlled",
        "deadline_reachable",
    }

    # Quicker services change the plan of the same version.
    await services(api, timeout_seconds=1)
    timeout = (await api.get("/v1/definitions/checkout/plan")).json()["steps"][1]["failures"][
        "timeout"
    ]
    assert (timeout["attempts"], timeout["error_kind"]) == (4, "timeout")


async def test_warnings_never_block_registration(api: httpx.AsyncClient) -> None:
    await services(api)
    doc = checkout()
    doc["steps"][0].pop("compensation")
    doc["steps"][1]["retry"] = {**RETRY, "jitter": False}
    doc["steps"].append({"name": "hook", "action": {"url": "http://127.0.0.1:9/hook"}})
    r = await api.post("/v1/definitions", json=doc)
    assert r.status_code == 201, r.text
    warnings = r.json()["warnings"]
    assert {(w["rule"], w["step"]) for w in warnings} == {
        ("compensation_missing", "charge_payment"),
        ("retries_controlled", "create_order"),
        ("isolation", "hook"),
    }
    assert all(not w["ok"] and w["message"] for w in warnings)

    # The same content again: 200, the same version, the same warnings.
    again = await api.post("/v1/definitions", json=doc)
    assert again.status_code == 200, again.text
    assert again.json()["version"] == 1
    assert again.json()["warnings"] == warnings

    # The definition is stored as sent, without warnings; the plan lists every finding.
    stored = (await api.get("/v1/definitions/checkout")).json()
    assert "warnings" not in stored
    checklist = (await api.get("/v1/definitions/checkout/plan")).json()["checklist"]
    assert [f for f in checklist if not f["ok"]] == warnings
    assert {f["rule"] for f in checklist if f["ok"]} == {
        "timeouts_defined",
        "fallback_or_noncritical",
        "deadline_reachable",
    }


async def test_the_api_token_reads_plans(db_url: str) -> None:
    settings = make_settings(SAGA_API_TOKEN="test-api-token-0123456789abcdef")
    admin = {"Authorization": "Bearer test-admin-token"}
    async with client_for(settings, db_url, headers=admin) as client:
        await services(client)
        assert (await client.post("/v1/definitions", json=checkout())).status_code == 201
        r = await client.get(
            "/v1/definitions/checkout/plan",
            headers={"Authorization": "Bearer test-api-token-0123456789abcdef"},
        )
        assert r.status_code == 200, r.text
        assert_problem(
            await client.get("/v1/definitions/checkout/plan", headers={"Authorization": ""}), 401
        )
