"""The OpenAPI document tells the whole truth: every operation has a description, an
example and its error answers (problem+json, with the headers they carry), and every
example fits its schema. The fuzzer (tests/fuzz) checks the answers against it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema_rs import Draft202012Validator  # comes with schemathesis

from tests.conftest import ADMIN_TOKEN

PROBLEM_JSON = "application/problem+json"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
METHODS = ("get", "put", "post", "patch", "delete")
# Every /v1 call can meet these whatever the operation: a Content-Length that is not a
# number (400), a missing token (401), a body over 1 MiB (413), the database down (503).
V1_ALWAYS = {"400", "401", "413", "503"}


@pytest.fixture
async def doc(api: httpx.AsyncClient) -> dict[str, Any]:
    r = await api.get("/openapi.json")
    assert r.status_code == 200, r.text
    document: dict[str, Any] = r.json()
    return document


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method.upper(), path, op


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema of the document, its `$ref`s resolved in the document."""
    return Draft202012Validator({**schema, "components": doc["components"]})


def examples_of(media: dict[str, Any]) -> list[Any]:
    found = [media["example"]] if "example" in media else []
    found += [e["value"] for e in media.get("examples", {}).values() if "value" in e]
    return found


async def test_every_operation_has_summary_and_description(doc: dict[str, Any]) -> None:
    missing = [
        f"{m} {p}"
        for m, p, op in operations(doc)
        if not op.get("summary") or len(op.get("description", "").strip()) < 20
    ]
    assert not missing, f"operations without a summary or description: {missing}"
    assert len(list(operations(doc))) >= 22


async def test_every_parameter_is_described(doc: dict[str, Any]) -> None:
    missing = [
        f"{method} {path} {p['in']} {p['name']}"
        for method, path, op in operations(doc)
        for p in op.get("parameters", [])
        if not p.get("description")
    ]
    assert not missing, f"parameters without a description: {missing}"


async def test_every_operation_has_an_example(doc: dict[str, Any]) -> None:
    missing = []
    for method, path, op in operations(doc):
        media = list(op.get("requestBody", {}).get("content", {}).values())
        for response in op["responses"].values():
            media += list(response.get("content", {}).values())
        if not any(examples_of(m) for m in media):
            missing.append(f"{method} {path}")
    assert not missing, f"operations without any example: {missing}"


async def test_every_success_answer_has_an_example(doc: dict[str, Any]) -> None:
    missing = [
        f"{method} {path} {code}"
        for method, path, op in operations(doc)
        for code, response in op["responses"].items()
        if code.startswith("2") and not any(examples_of(m) for m in response["content"].values())
    ]
    assert not missing, f"success answers without an example: {missing}"


async def test_every_example_fits_its_schema(doc: dict[str, Any]) -> None:
    checked = 0
    bad = []
    for method, path, op in operations(doc):
        places = [("request", op.get("requestBody", {}).get("content", {}))]
        places += [(code, r.get("content", {})) for code, r in op["responses"].items()]
        for where, content in places:
            for media_type, media in content.items():
                for example in examples_of(media):
                    errors = list(validator(doc, media.get("schema", {})).iter_errors(example))
                    checked += 1
                    if errors:
                        bad.append(f"{method} {path} {where} {media_type}: {errors[0].message}")
    assert not bad, "\n".join(bad)
    assert checked >= 60, checked


async def test_every_operation_declares_its_error_answers(doc: dict[str, Any]) -> None:
    problems = []
    for method, path, op in operations(doc):
        declared = set(op["responses"])
        want: set[str] = set()
        if path.startswith("/v1/callbacks/"):  # no bearer token: never a 401
            want |= V1_ALWAYS - {"401"}
        elif path.startswith("/v1/"):
            want |= V1_ALWAYS
            if path.startswith("/v1/admin/"):
                want.add("403")
            if op.get("parameters") or "requestBody" in op:
                want.add("422")
            if method in ("POST", "PUT"):
                want.add("415")
            if "{" in path:  # an unknown id, or a `/` in the value: no such endpoint
                want.add("404")
        else:
            want |= {"400", "413"}
        if missing := want - declared:
            problems.append(f"{method} {path} does not declare {sorted(missing)}")
        for code, response in op["responses"].items():
            if code[0] not in "45":
                continue
            content = response.get("content", {})
            if set(content) != {PROBLEM_JSON}:
                problems.append(f"{method} {path} {code}: content types {sorted(content)}")
            elif content[PROBLEM_JSON]["schema"] != {"$ref": "#/components/schemas/Problem"}:
                problems.append(f"{method} {path} {code}: not the Problem schema")
            if not response.get("description"):
                problems.append(f"{method} {path} {code}: no description")
    assert not problems, "\n".join(problems)


async def test_error_answers_declare_their_headers(doc: dict[str, Any]) -> None:
    problems = []
    for method, path, op in operations(doc):
        for code, response in op["responses"].items():
            headers = response.get("headers", {})
            if "X-Request-ID" not in headers:
                problems.append(f"{method} {path} {code}: no X-Request-ID")
            if code == "401" and "WWW-Authenticate" not in headers:
                problems.append(f"{method} {path} 401: no WWW-Authenticate")
            if code == "503" and "Retry-After" not in headers:
                problems.append(f"{method} {path} 503: no Retry-After")
    for method, path, op in operations(doc):
        if path.startswith("/v1/admin/"):
            assert op["security"] == [{"bearer": []}], (method, path)
        elif path.startswith("/v1/callbacks/"):
            assert op["security"] == [], (method, path)  # the token is in the path
        elif path.startswith("/v1/"):
            assert op["security"] == [{}, {"bearer": []}], (method, path)  # SAGA_API_TOKEN
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    start = doc["paths"]["/v1/sagas"]["post"]["responses"]
    assert start["201"]["headers"]["Location"]["required"] is True
    assert start["200"]["headers"]["Location"]["required"] is True
    assert "Idempotent-Replayed" in start["200"]["headers"]
    assert not problems, "\n".join(problems)


async def test_problem_schema(doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "errors"}
    item = problem["properties"]["errors"]["items"]
    assert item == {"$ref": "#/components/schemas/ProblemError"}
    assert "ProblemError" in doc["components"]["schemas"]
    # No stray FastAPI default: the 422 body is a Problem, not HTTPValidationError.
    assert "HTTPValidationError" not in doc["components"]["schemas"]


async def test_real_error_answers_fit_the_problem_schema(
    api: httpx.AsyncClient, doc: dict[str, Any]
) -> None:
    check = validator(doc, {"$ref": "#/components/schemas/Problem"})
    answers = [
        await api.get("/v1/sagas/00000000-0000-0000-0000-000000000000"),  # 404
        await api.get("/v1/sagas/not-a-uuid"),  # 422
        await api.get("/v1/sagas", params={"cursor": "!!"}),  # 400
        await api.post("/v1/sagas", content=b"{", headers={"content-type": "application/json"}),
        await api.post("/v1/sagas", content=b"x", headers={"content-type": "text/plain"}),  # 415
        await api.get("/v1/admin/audit"),  # 401
    ]
    assert [r.status_code for r in answers] == [404, 422, 400, 400, 415, 401]
    for r in answers:
        assert r.headers["content-type"] == PROBLEM_JSON, r.headers
        assert "x-request-id" in r.headers
        errors = [e.message for e in check.iter_errors(r.json())]
        assert not errors, (r.status_code, r.text, errors)
    assert answers[-1].headers["www-authenticate"] == "Bearer"


async def test_405_names_every_method_of_the_path(
    api: httpx.AsyncClient, doc: dict[str, Any]
) -> None:
    """`Allow` lists what the document lists for the path. (Starlette alone would answer
    `Allow: POST` for /v1/definitions, which also has GET: it names only the first route.)"""
    samples = {
        "{name}": "pay",
        "{version}": "1",
        "{saga_id}": "00000000-0000-0000-0000-000000000000",
        "{dl_id}": "00000000-0000-0000-0000-000000000000",
    }
    checked = 0
    for path, item in doc["paths"].items():
        declared = {m.upper() for m in item if m in METHODS}
        url = path
        for placeholder, value in samples.items():
            url = url.replace(placeholder, value)
        for method in sorted({"DELETE", "PATCH", "PUT", "POST"} - declared):
            r = await api.request(method, url, headers=ADMIN)
            assert r.status_code == 405, (method, url, r.text)
            assert r.headers["content-type"] == PROBLEM_JSON
            allow = {m.strip() for m in r.headers["allow"].split(",")}
            assert allow == declared, (method, url, r.headers["allow"])
            checked += 1
    assert checked > 40


OPERATION_IDS = {
    "GET /healthz": ("getHealth", "operations"),
    "GET /readyz": ("getReadiness", "operations"),
    "GET /metrics": ("getMetrics", "operations"),
    "PUT /v1/services/{name}": ("registerService", "services"),
    "GET /v1/services/{name}": ("getService", "services"),
    "GET /v1/services": ("listServices", "services"),
    "POST /v1/definitions": ("registerDefinition", "definitions"),
    "GET /v1/definitions": ("listDefinitions", "definitions"),
    "GET /v1/definitions/{name}": ("getDefinition", "definitions"),
    "GET /v1/definitions/{name}/versions/{version}": ("getDefinitionVersion", "definitions"),
    "GET /v1/definitions/{name}/plan": ("getDefinitionPlan", "definitions"),
    "GET /v1/definitions/{name}/versions/{version}/plan": (
        "getDefinitionVersionPlan",
        "definitions",
    ),
    "POST /v1/sagas": ("startSaga", "sagas"),
    "GET /v1/sagas": ("listSagas", "sagas"),
    "GET /v1/sagas/{saga_id}": ("getSaga", "sagas"),
    "GET /v1/sagas/{saga_id}/events": ("listSagaEvents", "sagas"),
    "POST /v1/sagas/{saga_id}/cancel": ("cancelSaga", "sagas"),
    "POST /v1/callbacks/{token}": ("reportCallback", "callbacks"),
    "GET /v1/admin/dead-letters": ("listDeadLetters", "admin"),
    "GET /v1/admin/dead-letters/{dl_id}": ("getDeadLetter", "admin"),
    "POST /v1/admin/dead-letters/{dl_id}/retry": ("retryDeadLetter", "admin"),
    "POST /v1/admin/dead-letters/{dl_id}/discard": ("discardDeadLetter", "admin"),
    "POST /v1/admin/services/{name}/circuit/reset": ("resetCircuit", "admin"),
    "GET /v1/admin/audit": ("listAuditEntries", "admin"),
    "GET /v1/admin/dashboard": ("getDashboard", "admin"),
}
# The business rules no schema can state, as named examples of these answers.
RULES = {
    ("GET /v1/services", "400"): {"bad-cursor"},
    ("GET /v1/definitions", "400"): {"bad-cursor"},
    ("GET /v1/sagas", "400"): {"bad-cursor"},
    ("GET /v1/sagas/{saga_id}/events", "400"): {"bad-cursor"},
    ("GET /v1/admin/dead-letters", "400"): {"bad-cursor"},
    ("GET /v1/admin/audit", "400"): {"bad-cursor"},
    ("POST /v1/sagas", "422"): {
        "unknown-definition",
        "idempotency-key-reused",
        "invalid-notify",
        "host-not-allowed",
    },
    ("PUT /v1/services/{name}", "422"): {"host-not-allowed"},
    ("POST /v1/definitions", "422"): {"invalid-definition", "retry-intervals"},
}


async def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV31SpecValidator

    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


async def test_operation_ids_and_tags_are_stable(doc: dict[str, Any]) -> None:
    """Generated clients name their modules and methods after these: they are API."""
    found = {
        f"{m} {p}": (op.get("operationId"), *op.get("tags", [])) for m, p, op in operations(doc)
    }
    assert found == OPERATION_IDS
    assert [t["name"] for t in doc["tags"]] == [
        "sagas",
        "definitions",
        "services",
        "callbacks",
        "admin",
        "operations",
    ]
    assert all(t.get("description") for t in doc["tags"])


async def test_no_parameter_is_nullable(doc: dict[str, Any]) -> None:
    """A query or header value is absent or a string: never `null` (FastAPI writes an
    optional parameter as `anyOf: [T, null]`; the document says what is sent)."""
    nullable = [
        f"{m} {p} {param['name']}"
        for m, p, op in operations(doc)
        for param in op.get("parameters", [])
        if "null" in json.dumps(param["schema"])
    ]
    assert not nullable, nullable
    key = next(
        p for p in doc["paths"]["/v1/sagas"]["post"]["parameters"] if p["name"] == "Idempotency-Key"
    )
    assert key["schema"]["type"] == "string" and key["schema"]["maxLength"] == 255
    assert "pattern" in key["schema"]


async def test_cursors_are_opaque_with_their_shape(doc: dict[str, Any]) -> None:
    lists = 0
    for method, path, op in operations(doc):
        for param in op.get("parameters", []):
            if param["name"] != "cursor":
                continue
            lists += 1
            assert param["schema"]["pattern"] == "^[A-Za-z0-9_-]{1,512}$", (method, path)
            assert "Opaque" in param["description"] and "bad-cursor" in param["description"]
    assert lists == 6


async def test_errors_and_calls_have_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    saga_error = {"anyOf": [{"$ref": "#/components/schemas/SagaError"}, {"type": "null"}]}
    step_error = {"anyOf": [{"$ref": "#/components/schemas/StepError"}, {"type": "null"}]}
    for name in ("SagaOut", "SagaSummaryOut"):
        assert schemas[name]["properties"]["error"] == saga_error, name
    for name in ("StepOut", "StepSummaryOut"):
        assert schemas[name]["properties"]["last_error"] == step_error, name
    assert set(schemas["SagaError"]["required"]) == {"step", "kind", "message"}
    assert set(schemas["StepError"]["required"]) == {
        "kind",
        "message",
        "status_code",
        "attempt",
        "direction",
    }
    # A call is one of two shapes, each a component (a generated client gets a class
    # for each): service + path, or url; the unused fields absent or null.
    shapes = [ref["$ref"].rsplit("/", 1)[1] for ref in schemas["CallSpec"]["oneOf"]]
    assert shapes == ["ServiceCall", "UrlCall"]
    assert set(schemas["ServiceCall"]["required"]) == {"service", "path"}
    assert set(schemas["UrlCall"]["required"]) == {"url"}
    # A notification target likewise; the saga view says how its notification went.
    targets = [ref["$ref"].rsplit("/", 1)[1] for ref in schemas["NotifySpec"]["oneOf"]]
    assert targets == ["ServiceNotify", "UrlNotify"]
    assert set(schemas["ServiceNotify"]["required"]) == {"service", "path"}
    assert set(schemas["UrlNotify"]["required"]) == {"url"}
    assert "method" not in schemas["UrlNotify"]["properties"]
    note = schemas["SagaOut"]["properties"]["notification"]
    assert {"$ref": "#/components/schemas/NotificationOut"} in note["anyOf"], note
    assert set(schemas["NotificationStatus"]["enum"]) == {
        "pending",
        "delivered",
        "failed",
    }
    assert schemas["ServiceCall"]["properties"]["url"]["type"] == "null"
    for shape in shapes:
        assert {"method", "headers", "body"} <= set(schemas[shape]["properties"]), shape
        assert schemas[shape]["additionalProperties"] is False
    assert schemas["ServiceSpec"]["properties"]["base_url"]["pattern"].startswith("^")
    assert "null" not in json.dumps(schemas["ServiceSpec"]["properties"]["base_url"])


async def test_business_rules_are_named_answers(doc: dict[str, Any]) -> None:
    """What a schema-valid request can still meet: one named example per rule, its
    `type` the problem type the server answers with (tests/integration/
    test_openapi_acceptance.py holds the server to this list)."""
    found = {}
    for method, path, op in operations(doc):
        for code, response in op["responses"].items():
            named = response.get("content", {}).get(PROBLEM_JSON, {}).get("examples", {})
            rules = set(named) - {"malformed-json", "validation"}
            if rules:
                found[(f"{method} {path}", code)] = rules
            for slug, example in named.items():
                kind = example["value"]["type"]
                assert kind.endswith(":" + slug) or slug == "retry-intervals", (path, slug)
    assert found == RULES


async def test_every_schema_example_fits_its_schema(doc: dict[str, Any]) -> None:
    """`examples` inside schemas (fields, parameters) fit the schema they are in."""
    checked = 0
    bad = []

    def walk(schema: Any, where: str) -> None:
        nonlocal checked
        if isinstance(schema, list):
            for i, item in enumerate(schema):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(schema, dict):
            return
        if isinstance(schema.get("examples"), list) and ("type" in schema or "anyOf" in schema):
            for example in schema["examples"]:
                checked += 1
                errors = list(validator(doc, schema).iter_errors(example))
                if errors:
                    bad.append(f"{where}: {example!r}: {errors[0].message}")
        for key, value in schema.items():
            if key not in ("examples", "example"):
                walk(value, f"{where}/{key}")

    walk(doc["components"]["schemas"], "components")
    for method, path, op in operations(doc):
        for param in op.get("parameters", []):
            walk(param["schema"], f"{method} {path} {param['name']}")
    assert not bad, "\n".join(bad)
    assert checked >= 10, checked
