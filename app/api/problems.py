"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.openapi import document
from app.logs import describe_error, safe_traceback
from app.usecases.errors import Problem as Problem

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal server error",
    503: "Service unavailable",
}


def problem_response(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    title = _TITLES.get(status, "Error")
    body = {
        "type": f"urn:saga-orchestrator:problem:{slug or title.lower().replace(' ', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "errors": errors or [],
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def pydantic_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic's errors without the offending input (it may be huge or secret)."""
    out = []
    for err in errors:
        msg = str(err.get("msg", "invalid value"))
        ctx_error = err.get("ctx", {}).get("error") if isinstance(err.get("ctx"), dict) else None
        if ctx_error is not None and msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(
            {
                "loc": [p for p in err.get("loc", ()) if isinstance(p, str | int)],
                "msg": msg,
                "type": str(err.get("type", "value_error")),
            }
        )
    return out


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. (Starlette's 405 names only the methods
    of the first route whose path matches, e.g. `POST` for `GET`+`POST /v1/definitions`.)"""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]


class DatabaseTrouble(Enum):
    UNAVAILABLE = "unavailable"  # cannot be reached now: 503 with Retry-After
    LOST = "lost"  # the connection broke mid-request: 503 with Retry-After
    FAILED = "failed"  # a statement failed: 500, logged without its data


def install(
    app: FastAPI,
    database_errors: tuple[type[Exception], ...],
    database_trouble: Callable[[BaseException], DatabaseTrouble | None],
) -> None:
    """Register handlers so that no error leaves the API as anything but problem+json,
    and say so in the OpenAPI document. The store's error types and the classifier that
    tells them apart come from the wiring (`main.py`)."""
    document(app)

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = pydantic_errors(exc.errors())
        if any(e["type"] == "json_invalid" for e in errors):
            return problem_response(
                400, "the request body is not valid JSON", slug="malformed-json", errors=errors
            )
        return problem_response(
            422, "the request has invalid fields: see errors", slug="validation", errors=errors
        )

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return problem_response(
            422,
            "the request has invalid fields: see errors",
            slug="validation",
            errors=pydantic_errors(exc.errors()),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "the request body could not be parsed as JSON (malformed or nested too deep)"
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := allowed_methods(request)):
            headers["Allow"] = ", ".join(methods)
        return problem_response(exc.status_code, detail, headers=headers)

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        trouble = database_trouble(exc)
        if trouble is DatabaseTrouble.FAILED or trouble is None:
            log.error(
                "database error", extra={"error": describe_error(exc), "where": safe_traceback(exc)}
            )
            return problem_response(500, "internal error; see the server log with the request id")
        log.warning("database unavailable", extra={"error": describe_error(exc)})
        what = "is unavailable" if trouble is DatabaseTrouble.UNAVAILABLE else "connection was lost"
        return problem_response(
            503,
            f"the database {what}; retry shortly",
            slug="database-unavailable",
            headers={"Retry-After": "2"},
        )

    for error_type in database_errors:
        app.add_exception_handler(error_type, _database)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error", extra={"error": describe_error(exc), "where": safe_traceback(exc)}
        )
        return problem_response(500, "internal error; see the server log with the request id")
