"""The one pooled HTTP client that calls participants, and what it observed.

It never raises for a participant's behaviour: every result, including timeouts and
broken connections, comes back as a `CallResult` for `classify` to judge.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from typing import Any

import httpcore
import httpx

from app.core.definition import check_json
from app.core.hosts import HostPolicy
from app.core.outcome import CallFailure, CallResult, parse_retry_after
from app.core.requests import HttpRequest
from app.participants.network import GuardedBackend, Resolver, blocked_reason, system_resolver

MAX_RESPONSE_BYTES = 1024 * 1024


class ParticipantClient:
    """A shared httpx.AsyncClient with a total per-attempt timeout, whose every connection
    goes through the host policy (see `network`): a refused host or address ends the
    attempt as `BLOCKED` before anything is sent."""

    def __init__(
        self,
        policy: HostPolicy | None = None,
        resolver: Resolver = system_resolver,
        max_connections: int = 200,
    ) -> None:
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        # The same pool httpx builds, on a network backend that checks every connection.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy or HostPolicy.parse("*"), resolver),
        )
        self._client = httpx.AsyncClient(
            transport=transport, follow_redirects=False, trust_env=False
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(self, request: HttpRequest, send_by: float | None = None) -> CallResult:
        """Make the call. `send_by` (time.monotonic()) is checked right before the request
        goes out: a process that was paused past it sends nothing (its lease may be gone).

        Never raises: a request that cannot even be built (a header value httpx cannot
        encode, a URL it cannot parse) is a `TEMPLATE` failure with nothing sent, and any
        other error once sending began is a lost connection (the call may have arrived).
        """
        try:
            content = None
            if request.body is not None or request.method not in ("GET", "DELETE"):
                content = json.dumps(request.body, separators=(",", ":")).encode()
            headers = {"Accept-Encoding": "identity", **request.headers}
            req = self._client.build_request(
                request.method,
                request.url,
                headers=headers,
                content=content,
                timeout=httpx.Timeout(request.timeout_seconds),
            )
        except Exception as exc:
            return CallResult(
                failure=CallFailure.TEMPLATE,
                message=f"the request could not be built ({type(exc).__name__}); nothing was sent",
            )
        if send_by is not None and time.monotonic() > send_by:
            return CallResult(
                failure=CallFailure.CONNECT,
                message="not sent: this worker was paused past its lease",
            )
        try:
            async with asyncio.timeout(request.timeout_seconds):
                response = await self._client.send(req, stream=True)
                try:
                    raw, too_large = await read_limited(response, MAX_RESPONSE_BYTES)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException) as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                return CallResult(failure=CallFailure.CONNECT, message="connect timeout")
            return CallResult(
                failure=CallFailure.TIMEOUT,
                message=f"no answer within {request.timeout_seconds:g}s",
            )
        except httpx.ConnectError as exc:
            blocked = blocked_reason(exc)
            if blocked is not None:
                return CallResult(failure=CallFailure.BLOCKED, message=f"not sent: {blocked}")
            return CallResult(failure=CallFailure.CONNECT, message=f"cannot connect: {exc}")
        except httpx.LocalProtocolError as exc:
            # The client refused to write our request (its line or headers break HTTP):
            # it never went out, like a request that could not be built.
            return CallResult(
                failure=CallFailure.TEMPLATE,
                message=f"the request could not be sent ({type(exc).__name__}); nothing was sent",
            )
        except Exception as exc:
            # Anything after the connection was made: the request may have arrived.
            return CallResult(
                failure=CallFailure.CONNECTION_LOST,
                message=f"connection lost: {type(exc).__name__}",
            )
        status = response.status_code
        if too_large and 200 <= status < 300:
            return CallResult(
                status_code=status,
                failure=CallFailure.TOO_LARGE,
                message=f"participant answered {status} with a body over "
                f"{MAX_RESPONSE_BYTES} bytes; the response is not kept",
            )
        return CallResult(
            status_code=status,
            body=_parse_body(raw, response.headers.get("content-type", "")),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            message=_error_message(status, raw),
        )


async def read_limited(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """The body, decompressed, and whether it went over `limit` bytes.

    Reads the raw stream and decompresses it here, never more than `limit` + 1 bytes
    of output at a time, so a small compressed body cannot inflate in memory (a gzip
    bomb costs at most `limit`). An encoding we cannot decode gives an empty body.
    """
    decoder = _decoder(response.headers.get("content-encoding", ""))
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        if decoder is None:
            return b"", False
        pending = chunk
        while pending:
            if decoder is _IDENTITY:
                out, pending = pending, b""
            else:
                try:
                    out = decoder.decompress(pending, limit - size + 1)
                except zlib.error:
                    return b"", False  # not what its Content-Encoding says: no body
                pending = decoder.unconsumed_tail
            size += len(out)
            if size > limit:
                return b"".join(chunks), True
            chunks.append(out)
    return b"".join(chunks), False


_IDENTITY: Any = object()


def _decoder(content_encoding: str) -> Any:
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return _IDENTITY
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    if encoding == "deflate":
        return zlib.decompressobj(wbits=zlib.MAX_WBITS)
    return None


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
