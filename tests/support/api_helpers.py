"""Small helpers for API tests: problem+json checks, custom-settings clients, documents."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from app.main import create_app
from app.settings import Settings
from tests.support.servers import serve

PROBLEM_KEYS = {"type", "title", "status", "detail", "errors"}


def assert_problem(r: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem document (with the given status); returns it."""
    if status is not None:
        assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert 400 <= r.status_code < 600, r.text
    ctype = r.headers.get("content-type", "")
    assert ctype.startswith("application/problem+json"), f"content-type {ctype!r}: {r.text}"
    body = r.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == r.status_code
    assert isinstance(body["errors"], list)
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in r.text
    return body


def error_locs(problem: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in problem["errors"]]


def has_loc(problem: dict[str, Any], *loc: Any) -> bool:
    """Some error's loc starts with `loc` (pydantic may add a validator tag after it)."""
    return any(tuple(e["loc"][: len(loc)]) == loc for e in problem["errors"])


@contextlib.asynccontextmanager
async def client_for(
    settings: Settings, db_url: str, *, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API (no executor) built with these settings, over real HTTP."""
    app = create_app(settings, db_url, run_executor=False)
    async with (
        serve(app) as base,
        httpx.AsyncClient(base_url=base, timeout=40, headers=headers) as client,
    ):
        yield client


def service_doc(base_url: str = "http://127.0.0.1:9001", **extra: Any) -> dict[str, Any]:
    return {"base_url": base_url, **extra}


def simple_definition(name: str = "flow", service: str = "pay", **extra: Any) -> dict[str, Any]:
    """A sound two-step definition calling `service`."""
    return {
        "name": name,
        "steps": [
            {
                "name": "a",
                "action": {"service": service, "path": "/a", "body": {"x": "${input.x}"}},
                "compensation": {
                    "service": service,
                    "path": "/a/undo",
                    "body": {"id": "${steps.a.response.id}"},
                },
            },
            {
                "name": "b",
                "action": {
                    "service": service,
                    "path": "/b",
                    "body": {"from_a": "${steps.a.response.id}", "saga": "${saga.id}"},
                },
            },
        ],
        **extra,
    }
