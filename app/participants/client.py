"""The one pooled HTTP client that calls participants, and what it observed.

It never raises for a participant's behaviour: every result, including timeouts and
broken connections, comes back as a `CallResult` for `classify` to judge.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from app.domain.definition import check_json
from app.resilience.outcome import CallFailure, CallResult, parse_retry_after

MAX_RESPONSE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A fully rendered participant call."""

    method: str
    url: str
    headers: dict[str, str]
    body: Any
    timeout_seconds: float

    def redacted(self, secret_headers: set[str]) -> dict[str, Any]:
        """The request as stored in a dead letter: secret header values masked."""
        secrets = {h.lower() for h in secret_headers} | {"authorization"}
        return {
            "method": self.method,
            "url": self.url,
            "headers": {
                k: ("[redacted]" if k.lower() in secrets else v) for k, v in self.headers.items()
            },
            "body": self.body,
        }


class ParticipantClient:
    """A shared httpx.AsyncClient with a total per-attempt timeout."""

    def __init__(self, max_connections: int = 200) -> None:
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(
        self, request: HttpRequest, now: datetime | None = None, send_by: float | None = None
    ) -> CallResult:
        """Make the call. `send_by` (time.monotonic()) is checked right before the request
        goes out: a process that was paused past it sends nothing (its lease may be gone)."""
        content = None
        if request.body is not None or request.method not in ("GET", "DELETE"):
            content = json.dumps(request.body, separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(request.timeout_seconds):
                req = self._client.build_request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    content=content,
                    timeout=httpx.Timeout(request.timeout_seconds),
                )
                if send_by is not None and time.monotonic() > send_by:
                    return CallResult(
                        failure=CallFailure.CONNECT,
                        message="not sent: this worker was paused past its lease",
                    )
                response = await self._client.send(req, stream=True)
                try:
                    raw = await _read_limited(response)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException) as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                return CallResult(failure=CallFailure.CONNECT, message=f"connect timeout: {exc}")
            return CallResult(
                failure=CallFailure.TIMEOUT,
                message=f"no answer within {request.timeout_seconds:g}s",
            )
        except httpx.ConnectError as exc:
            return CallResult(failure=CallFailure.CONNECT, message=f"cannot connect: {exc}")
        except httpx.HTTPError as exc:
            # Anything after the connection was made: the request may have arrived.
            return CallResult(
                failure=CallFailure.CONNECTION_LOST,
                message=f"connection lost: {type(exc).__name__}: {exc}",
            )
        return CallResult(
            status_code=response.status_code,
            body=_parse_body(raw, response.headers.get("content-type", "")),
            retry_after=parse_retry_after(response.headers.get("retry-after"), now),
            message=_error_message(response.status_code, raw),
        )


async def _read_limited(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(raw: bytes, content_type: str) -> Any:
    """A JSON body becomes the step's response; anything else is not kept."""
    if not raw or "json" not in content_type.lower():
        return None
    try:
        value = json.loads(raw)
        check_json(value, "response")
    except (ValueError, RecursionError):
        return None
    return value


def _error_message(status: int, raw: bytes) -> str:
    if 200 <= status < 300:
        return ""
    snippet = raw[:300].decode("utf-8", "replace").replace("\x00", "")
    return f"participant answered {status}" + (f": {snippet}" if snippet else "")
