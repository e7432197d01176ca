"""Operations endpoints: liveness, readiness, metrics, and the OpenAPI document."""

from __future__ import annotations

import re

import httpx

from app.store.migrate import head_revision

V1_OPERATIONS = {
    ("put", "/v1/services/{}"),
    ("get", "/v1/services"),
    ("get", "/v1/services/{}"),
    ("post", "/v1/definitions"),
    ("get", "/v1/definitions"),
    ("get", "/v1/definitions/{}"),
    ("get", "/v1/definitions/{}/versions/{}"),
    ("post", "/v1/sagas"),
    ("get", "/v1/sagas"),
    ("get", "/v1/sagas/{}"),
    ("get", "/v1/sagas/{}/events"),
    ("post", "/v1/sagas/{}/cancel"),
}


def _shape(path: str) -> str:
    """`/v1/sagas/{saga_id}` -> `/v1/sagas/{}`: parameter names are the server's business."""
    return re.sub(r"\{[^}]+\}", "{}", path)


async def test_healthz(api: httpx.AsyncClient) -> None:
    r = await api.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok"}
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")


async def test_readyz_reports_schema_head(api: httpx.AsyncClient) -> None:
    r = await api.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["schema"] == head_revision()
    assert body["schema"]


async def test_metrics_is_prometheus_text(api: httpx.AsyncClient) -> None:
    r = await api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in r.text or "# HELP" in r.text


async def test_openapi_lists_v1_paths(api: httpx.AsyncClient) -> None:
    r = await api.get("/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    operations = {
        (method, _shape(path))
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "patch", "delete")
    }
    missing = V1_OPERATIONS - operations
    assert not missing, f"not in /openapi.json: {sorted(missing)}"
    paths = {_shape(p) for p in doc["paths"]}
    assert {"/healthz", "/readyz"} <= paths


async def test_openapi_documents_request_bodies(api: httpx.AsyncClient) -> None:
    doc = (await api.get("/openapi.json")).json()
    by_shape = {_shape(p): item for p, item in doc["paths"].items()}
    for method, path in [
        ("put", "/v1/services/{}"),
        ("post", "/v1/definitions"),
        ("post", "/v1/sagas"),
    ]:
        op = by_shape[path][method]
        content = op["requestBody"]["content"]
        assert "application/json" in content, (path, content)
    schemas = doc["components"]["schemas"]
    assert {"ServiceSpec", "DefinitionSpec"} <= set(schemas), sorted(schemas)


async def test_docs_page(api: httpx.AsyncClient) -> None:
    r = await api.get("/docs")
    assert r.status_code == 200
    assert "openapi.json" in r.text
