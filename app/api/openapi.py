"""What the OpenAPI document says beyond the models: error answers, headers, examples.

Routes declare their answers with `answer(...)` (success, with an example) and
`problems(...)` (RFC 9457 bodies as `application/problem+json`, with one named example
per business rule that no schema can state); `document(app)` adds the `Problem` schema
to the components and `X-Request-ID` to every response, and says of every parameter
what FastAPI cannot (a header or query value is never null: it is absent), so the
document describes every answer the API can give. `operation_id` names each operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

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
        "Invalid fields: wrong types, values out of range, unknown fields, a string with a "
        "NUL character (`\\u0000`, which no document may hold), JSON nested over 64 "
        "levels, or a rule broken; `errors` lists each with its location.",
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
# Business rules beyond any schema: slug: (status, detail of the example, where). Each
# is a named example of the operation's answer with that status, its `type` the
# problem's `type`, so a client knows which refusals a valid document can still meet.
RULES: dict[str, tuple[int, str, list[str | int]]] = {
    "bad-cursor": (
        400,
        "cursor is not valid: pass next_cursor from a previous page unchanged",
        ["query", "cursor"],
    ),
    "unknown-definition": (422, "there is no definition 'checkout'", ["body", "definition"]),
    "idempotency-key-reused": (
        422,
        "this Idempotency-Key was used with a different definition or input",
        [],
    ),
    "host-not-allowed": (
        422,
        "base_url is not allowed: 10.0.0.5:80 lies in no IP/CIDR entry of SAGA_ALLOWED_HOSTS",
        ["body", "base_url"],
    ),
    "invalid-notify": (
        422,
        "unknown service 'hooks': register it first (PUT /v1/services/…)",
        ["body", "notify", "service"],
    ),
    "invalid-definition": (
        422,
        "unknown service 'payments': register it first (PUT /v1/services/…)",
        ["body", "steps", 0, "action", "service"],
    ),
}
# A rule of a single document that JSON Schema cannot state (it compares two fields):
# answered as any invalid field is, and named among the examples too.
RETRY_INTERVALS = {
    "summary": "max_interval_seconds below initial_interval_seconds",
    "value": {
        "type": "urn:saga-orchestrator:problem:validation",
        "title": "Unprocessable content",
        "status": 422,
        "detail": "the request has invalid fields: see errors",
        "errors": [
            {
                "loc": ["body", "steps", 0, "retry"],
                "msg": "max_interval_seconds must be >= initial_interval_seconds",
                "type": "value_error",
            }
        ],
    },
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


RULE_TYPE = "urn:saga-orchestrator:problem:"


def rule_example(slug: str) -> dict[str, Any]:
    status, detail, loc = RULES[slug]
    errors = [{"loc": loc, "msg": detail, "type": "value_error"}] if loc else []
    return {
        "summary": f"Business rule: {slug}",
        "value": {**problem_example(status, detail), "type": RULE_TYPE + slug, "errors": errors},
    }


def problems(
    *codes: int,
    notes: Mapping[int, str] | None = None,
    rules: Sequence[str] = (),
    examples: Mapping[int, Mapping[str, Any]] | None = None,
) -> Responses:
    """Problem answers for these status codes; `notes` replaces a code's description,
    `rules` names the business rules (slugs of `RULES`) the operation applies, each an
    example of its status, and `examples` adds other named examples."""
    notes = notes or {}
    named: dict[int, dict[str, Any]] = {code: dict(more) for code, more in (examples or {}).items()}
    for slug in rules:
        named.setdefault(RULES[slug][0], {})[slug] = rule_example(slug)
    out: Responses = {}
    for code in sorted({*codes, *notes, *named}):
        description = notes.get(code) or _PROBLEMS[code][0]
        media: dict[str, Any] = {"schema": PROBLEM_REF}
        if code in named:
            default = {"summary": _PROBLEMS[code][1], "value": problem_example(code)}
            media["examples"] = {_PROBLEMS[code][2]: default, **named[code]}
        else:
            media["example"] = problem_example(code)
        response: dict[str, Any] = {"description": description, "content": {PROBLEM_JSON: media}}
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


# Operation ids are the routes' function names in camelCase, but for these: a generated
# client names its methods after them, so they are part of the API (tests pin them).
OPERATION_IDS = {
    "put_service": "registerService",
    "post_definition": "registerDefinition",
    "get_plan": "getDefinitionPlan",
    "get_version_plan": "getDefinitionVersionPlan",
    "saga_events": "listSagaEvents",
    "report_callback": "reportCallback",
    "audit_log": "listAuditEntries",
    "reset_circuit": "resetCircuit",
    "dashboard_json": "getDashboard",
    "healthz": "getHealth",
    "readyz": "getReadiness",
    "metrics": "getMetrics",
}
TAGS = [
    {"name": "sagas", "description": "Start sagas, follow them, read their history, cancel."},
    {"name": "definitions", "description": "Saga definitions: steps, calls, retry policies."},
    {"name": "services", "description": "Participant services: where calls go, and how."},
    {
        "name": "callbacks",
        "description": "Participants report a callback step's outcome (no bearer token: "
        "the callback URL's token is the credential).",
    },
    {"name": "admin", "description": "Operators (admin token): dead letters, breakers, audit."},
    {"name": "operations", "description": "Liveness, readiness and metrics."},
]


def operation_id(route: APIRoute) -> str:
    """`startSaga` for `start_saga`: the stable, readable id of a route's operation."""
    if route.name in OPERATION_IDS:
        return OPERATION_IDS[route.name]
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without the `null` branch of an optional value: a header or
    query parameter is absent or a string, never null (FastAPI writes `T | None` as
    `anyOf: [T, null]`)."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list) or {"type": "null"} not in branches:
        return schema
    rest = [b for b in branches if b != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(rest) == 1:
        return {**rest[0], **out}
    return {**out, "anyOf": rest}


def _hoist_shapes(schemas: dict[str, Any]) -> None:
    """Give the titled `oneOf` shapes of a component (CallSpec's ServiceCall and UrlCall)
    components of their own, so that a generated client gets one class for each."""
    for schema in list(schemas.values()):
        for i, shape in enumerate(schema.get("oneOf", [])):
            title = shape.get("title")
            if title and "$ref" not in shape and title not in schemas:
                schemas[title] = shape
                schema["oneOf"][i] = {"$ref": f"#/components/schemas/{title}"}


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
            _hoist_shapes(schemas)
            components.setdefault("securitySchemes", {})["bearer"] = BEARER
            for path, item in schema.get("paths", {}).items():
                for operation in item.values():
                    for parameter in operation.get("parameters", []):
                        parameter["schema"] = _not_null(parameter["schema"])
                    if path.startswith("/v1/admin/"):
                        operation.setdefault("security", [{"bearer": []}])
                    elif path.startswith("/v1/callbacks/"):
                        operation.setdefault("security", [])  # the path's token is the credential
                    elif path.startswith("/v1/"):
                        operation.setdefault("security", [{}, {"bearer": []}])
                    for response in operation.get("responses", {}).values():
                        response.setdefault("headers", {}).setdefault("X-Request-ID", REQUEST_ID)
            app.openapi_schema = _with_nulls(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
