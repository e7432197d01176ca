"""Pure ASGI middleware: request ids, and refusing oversize bodies before reading them."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.auth import Tokens, access_for, check
from app.api.problems import Problem
from app.logs import request_id_var

MAX_BODY_BYTES = 1024 * 1024
_VALID_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
access_log = logging.getLogger("app.access")


class RequestIdMiddleware:
    """Take the caller's X-Request-ID (if sane) or make one; echo it; log the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if given and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status = 500
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 2),
                },
            )
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length at once, else while streaming."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _send_problem(send, 400, "Content-Length is not a number")
                    return
                if length > self.limit:
                    await _send_problem(
                        send, 413, f"request body is over the {self.limit} byte limit"
                    )
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body is over the {self.limit} byte limit")
            return message

        await self.app(scope, limited_receive, send)


class V1GuardMiddleware:
    """On /v1/, before any body is read: the bearer token (401/403), then the
    Content-Type of a body (415), so a caller learns the first thing to fix."""

    def __init__(self, app: ASGIApp, tokens: Tokens) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        access = access_for(str(scope.get("method", "")), path)
        result = check(self.tokens, headers.get(b"authorization"), access)
        if isinstance(result, Problem):
            extra = [(k.lower().encode(), v.encode()) for k, v in result.headers.items()]
            await _send_problem(send, result.status, result.detail, extra)
            return
        has_body = headers.get(b"content-length", "0") not in ("", "0") or (
            b"transfer-encoding" in headers
        )
        writes = scope.get("method") in ("POST", "PUT", "PATCH")
        if writes and has_body and not _is_json(headers.get(b"content-type", "")):
            await _send_problem(
                send, 415, "send the body as JSON with Content-Type: application/json"
            )
            return
        await self.app(scope, receive, send)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Request body too large",
    415: "Unsupported media type",
}


async def _send_problem(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    title = _TITLES[status]
    body = json.dumps(
        {
            "type": f"urn:saga-orchestrator:problem:{title.lower().replace(' ', '-')}",
            "title": title,
            "status": status,
            "detail": detail,
            "errors": [],
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
