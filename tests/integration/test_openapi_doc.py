"""The OpenAPI document tells the whole truth: every operation has a description, an
example and its error answers (problem+json, with the headers they carry), and every
example fits its schema. The fuzzer (tests/fuzz) checks the answers against it."""

from __future__ import annotations

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
        if path.startswith("/v1/"):
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
