"""What the OpenAPI document says beyond the models: error answers, headers, examples.

Routes declare their answers with `answer(...)` (success, with an example) and
`problems(...)` (RFC 9457 bodies as `application/problem+json`); `document(app)` adds
the `Problem` schema to the components and `X-Request-ID` to every response, so the
document describes every answer the API can give.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI

from app.api.schemas import ProblemDetails

PROBLEM_JSON = "application/problem+json"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
Responses = dict[int | str, dict[str, Any]]


def header(
    description: str, example: str, schema: dict[str, Any] | None = None, required: bool = True
) -> dict[str, Any]:
    return {
        "description": description,
        "required": required,
        "schema": schema or {"type": "string"},
        "example": example,
    }


REQUEST_ID = header(
    "The caller's `X-Request-ID` when it is 1-128 visible ASCII characters, else a new id; "
    "the logs carry it.",
    "4f1c2a7e9b0d4e6f8a1b2c3d4e5f6a7b",
)
RETRY_AFTER = header("Seconds to wait before trying again.", "2", {"type": "string"})
WWW_AUTHENTICATE = header("The scheme to use.", "Bearer")
LOCATION = header("Where the saga lives.", "/v1/sagas/0b7e4a52-3c1d-4f7a-9a52-8e2b1c4d5f60")
IDEMPOTENT_REPLAYED = header(
    "Present on a replay: an earlier start with this Idempotency-Key made the saga.",
    "true",
    {"type": "string", "enum": ["true"]},
)

BEARER = {
    "type": "http",
    "scheme": "bearer",
    "description": "`/v1/admin/` always needs the admin token (SAGA_ADMIN_TOKEN). The rest of "
    "`/v1/` needs SAGA_API_TOKEN (or the admin token) when it is set, and is open otherwise.",
}

# code: (description, title, slug, detail) - the last three make the example body.
_PROBLEMS: dict[int, tuple[str, str, str, str]] = {
    400: (
        "Malformed request: the body is not valid JSON, `cursor` is not a `next_cursor` "
        "from an earlier page, or Content-Length is not a number.",
        "Bad request",
        "malformed-json",
        "the request body is not valid JSON",
    ),
    401: (
        "Missing or wrong bearer token (`/v1/` needs one when SAGA_API_TOKEN is set; "
        "`/v1/admin/` always needs the admin token).",
        "Unauthorized",
        "unauthorized",
        "send Authorization: Bearer <token>",
    ),
    403: (
        "The API token is valid but this endpoint needs the admin token.",
        "Forbidden",
        "forbidden",
        "this endpoint needs the admin token",
    ),
    404: ("No such resource.", "Not found", "not-found", "no saga with id …"),
    409: (
        "The resource is in a state that does not allow this.",
        "Conflict",
        "conflict",
        "saga is already compensated",
    ),
    413: (
        "The request body is over 1 MiB.",
        "Request body too large",
        "request-body-too-large",
        "request body is over the 1048576 byte limit",
    ),
    415: (
        "A body was sent with a Content-Type other than JSON.",
        "Unsupported media type",
        "unsupported-media-type",
        "send the body as JSON with Content-Type: application/json",
    ),
    422: (
        "Invalid fields: wrong types, values out of range, unknown fields, or a rule "
        "broken; `errors` lists each with its location.",
        "Unprocessable content",
        "validation",
        "the request has invalid fields: see errors",
    ),
    503: (
        "The database is unavailable; retry after `Retry-After` seconds.",
        "Service unavailable",
        "database-unavailable",
        "the database is unavailable; retry shortly",
    ),
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": WWW_AUTHENTICATE},
    503: {"Retry-After": RETRY_AFTER},
}


def problem_example(status: int, detail: str | None = None) -> dict[str, Any]:
    _, title, slug, default_detail = _PROBLEMS[status]
    errors: list[dict[str, Any]] = []
    if status == 422:
        errors = [{"loc": ["body", "name"], "msg": "Field required", "type": "missing"}]
    return {
        "type": f"urn:saga-orchestrator:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail or default_detail,
        "errors": errors,
    }


def problems(*codes: int, notes: Mapping[int, str] | None = None) -> Responses:
    """Problem answers for these status codes; `notes` replaces a code's description."""
    notes = notes or {}
    out: Responses = {}
    for code in sorted({*codes, *notes}):
        description = notes.get(code) or _PROBLEMS[code][0]
        response: dict[str, Any] = {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": PROBLEM_REF, "example": problem_example(code)}},
        }
        if code in _HEADERS:
            response["headers"] = dict(_HEADERS[code])
        out[code] = response
    return out


def answer(
    status: int,
    description: str,
    example: Any,
    *,
    model: Any = None,
    headers: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
) -> Responses:
    """A success answer with an example (and its model, when it is not the route's own)."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"example": _keep_nulls(example)}},
    }
    if model is not None:
        response["model"] = model
    if headers:
        response["headers"] = headers
    if links:
        response["links"] = links
    return {status: response}


def link(method: str, path: str, description: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link: where a value of this answer (`$response.body#/id`) is used next."""
    pointer = path.replace("~", "~0").replace("/", "~1").replace("{", "%7B").replace("}", "%7D")
    return {
        "operationRef": f"#/paths/{pointer}/{method.lower()}",
        "parameters": parameters,
        "description": description,
    }


def saga_links() -> dict[str, Any]:
    where = "$response.body#/id"
    return {
        "GetSaga": link("GET", "/v1/sagas/{saga_id}", "Follow the saga", saga_id=where),
        "GetSagaEvents": link("GET", "/v1/sagas/{saga_id}/events", "Its history", saga_id=where),
        "CancelSaga": link("POST", "/v1/sagas/{saga_id}/cancel", "Cancel it", saga_id=where),
    }


# FastAPI drops every `null` from the document, examples included, which would leave a
# required nullable field (`finished_at`, `error`, …) out of an example: examples carry
# this marker instead, and `document` turns it back into null.
_NULL = "<null: see app.api.openapi>"


def _keep_nulls(value: Any) -> Any:
    if value is None:
        return _NULL
    if isinstance(value, dict):
        return {k: _keep_nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keep_nulls(v) for v in value]
    return value


def _with_nulls(value: Any) -> Any:
    if value == _NULL:
        return None
    if isinstance(value, dict):
        return {k: _with_nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_nulls(v) for v in value]
    return value


# Every /v1 call may meet these: a bad Content-Length (400), a missing token (401), an
# oversize body (413) or an unavailable database (503).
V1 = (400, 401, 413, 503)


def document(app: FastAPI) -> None:
    """Add the Problem schema, the bearer scheme and the X-Request-ID header to the
    generated document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            problem = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(problem.pop("$defs", {}))
            schemas["Problem"] = problem
            components.setdefault("securitySchemes", {})["bearer"] = BEARER
            for path, item in schema.get("paths", {}).items():
                for operation in item.values():
                    if path.startswith("/v1/admin/"):
                        operation.setdefault("security", [{"bearer": []}])
                    elif path.startswith("/v1/"):
                        operation.setdefault("security", [{}, {"bearer": []}])
                    for response in operation.get("responses", {}).values():
                        response.setdefault("headers", {}).setdefault("X-Request-ID", REQUEST_ID)
            app.openapi_schema = _with_nulls(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
