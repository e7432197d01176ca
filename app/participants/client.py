"""The one pooled HTTP client that calls participants, and what it observed.

It never raises for a participant's behaviour: every result, including timeouts and
broken connections, comes back as a `CallResult` for `classify` to judge. It is built on
aiohttp, which spends a fraction of httpx's CPU on a request (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import certifi
from yarl import URL

from app.core.definition import check_json, header_value_problem
from app.core.hosts import Decision, HostPolicy
from app.core.outcome import CallFailure, CallResult, parse_retry_after
from app.core.requests import HttpRequest
from app.participants.network import GuardedResolver, Resolver, blocked_reason, system_resolver

MAX_RESPONSE_BYTES = 1024 * 1024
KEEPALIVE_SECONDS = 5.0  # an idle connection is closed after this long (httpx's default)


class ParticipantClient:
    """A shared aiohttp session with a total per-attempt timeout, whose every connection
    goes through the host policy (see `network`): a refused host or address ends the
    attempt as `BLOCKED` before anything is sent.

    One attempt is one send: no redirect is followed, no request is sent again, no proxy
    or cookie of the environment or of an earlier answer is used, and the body is read
    raw and decompressed here within a bound."""

    def __init__(
        self,
        policy: HostPolicy | None = None,
        resolver: Resolver = system_resolver,
        max_connections: int = 0,
    ) -> None:
        self._policy = policy or HostPolicy.parse("*")
        self._resolver = GuardedResolver(self._policy, resolver)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._decisions: dict[tuple[str, int], Decision] = {}

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            # No DNS cache: each new connection resolves and checks its name again, so a
            # name that moved to a refused address is refused at the next connection (a
            # cached answer was checked when it was cached, so it would only ever lead to
            # an address allowed then; but it would outlive a change for its TTL).
            use_dns_cache=False,
            # No cap by default (0): the calls in flight are bounded by the executor's
            # concurrency and each service's bulkhead. A client-wide cap is a bulkhead
            # across services: one slow service's calls held it, every other service's
            # calls queued behind them until their timeouts, and those timeouts opened
            # their breakers.
            limit=self._max_connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_SECONDS,
            # The certificates httpx trusted (certifi's), not the system's store.
            ssl=ssl.create_default_context(cafile=certifi.where()),
        )
        session = aiohttp.ClientSession(
            connector=connector,
            # The attempt's timeout is the caller's total (asyncio.timeout in `call`);
            # aiohttp's own (a 5-minute total among them) must not cut it shorter.
            timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None),
            auto_decompress=False,  # read_limited decompresses, within its bound
            trust_env=False,  # no proxy or .netrc from the environment
            cookie_jar=aiohttp.DummyCookieJar(),  # a participant's cookie is not kept
            # Only the headers the request has: no Content-Type of aiohttp's own (the
            # engine sets one on every request; httpx added none either).
            skip_auto_headers=("Content-Type",),
            # An answer's headers stay within aiohttp's bounds (a line of 8190 bytes,
            # 128 headers): their memory is bounded, as the body's is.
        )
        # aiohttp sends a GET, PUT or DELETE once more, on a new connection, when a
        # kept-alive one turns out closed. That second send may be a duplicate (the
        # first may have arrived), and one attempt must be one send: whether and when to
        # try again is the engine's decision (its retry policy, its attempt count). There
        # is no public option for it.
        session._retry_connection = False
        self._session = session
        return session

    def _written(self, host: str, port: int) -> Decision:
        """The policy's decision on a written host, kept: the policy does not change, and
        a URL's host is never data (only its path and query take `${…}`)."""
        decision = self._decisions.get((host, port))
        if decision is None:
            if len(self._decisions) >= 4096:
                self._decisions.clear()
            decision = self._decisions[host, port] = self._policy.written(host, port)
        return decision

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, request: HttpRequest, send_by: float | None = None) -> CallResult:
        """Make the call. `send_by` (time.monotonic()) is checked right before the request
        goes out: a process that was paused past it sends nothing (its lease may be gone).

        Never raises: a request that cannot even be built (a header value HTTP cannot
        carry, a URL that cannot be sent) is a `TEMPLATE` failure with nothing sent, and
        any other error once sending began is a lost connection (the call may have arrived).
        """
        try:
            url, host, port = _target(request.url)
            headers = {"Accept-Encoding": "identity", **request.headers}
            for name, value in headers.items():
                problem = _header_problem(name, value)
                if problem:
                    raise ValueError(f"header {name!r} {problem}")
            content = None
            if request.body is not None or request.method not in ("GET", "DELETE"):
                content = json.dumps(request.body, separators=(",", ":")).encode()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ValueError) and str(exc) else type(exc).__name__
            return CallResult(
                failure=CallFailure.TEMPLATE,
                message=f"the request could not be built ({reason}); nothing was sent",
            )
        # aiohttp connects to a host written as an IP address without asking any
        # resolver, so the written host is judged here, before anything is sent; a name
        # is judged again with every address it resolves to, on each new connection
        # (GuardedResolver).
        decision = self._written(host, port)
        if decision.refused:
            return CallResult(failure=CallFailure.BLOCKED, message=f"not sent: {decision.reason}")
        if send_by is not None and time.monotonic() > send_by:
            return CallResult(
                failure=CallFailure.CONNECT,
                message="not sent: this worker was paused past its lease",
            )
        session = self._session or self._open()
        try:
            async with asyncio.timeout(request.timeout_seconds):
                response = await session.request(
                    request.method, url, headers=headers, data=content, allow_redirects=False
                )
                try:
                    raw, too_large = await read_limited(
                        response.content.iter_any(),
                        response.headers.get("Content-Encoding", ""),
                        MAX_RESPONSE_BYTES,
                    )
                finally:
                    # A body read to its end leaves the connection to be used again;
                    # one cut short (too large) closes it.
                    if response.content.is_eof():
                        response.release()
                    else:
                        response.close()
        except TimeoutError:
            return CallResult(
                failure=CallFailure.TIMEOUT,
                message=f"no answer within {request.timeout_seconds:g}s",
            )
        except aiohttp.ClientConnectorError as exc:
            blocked = blocked_reason(exc)
            if blocked is not None:
                return CallResult(failure=CallFailure.BLOCKED, message=f"not sent: {blocked}")
            return CallResult(
                failure=CallFailure.CONNECT, message=f"cannot connect: {exc.os_error}"
            )
        except aiohttp.InvalidURL as exc:
            # aiohttp refuses to connect to this host as written (an IPv4 address in a
            # legacy spelling, `2130706433`): it never went out.
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
        status = response.status
        if too_large and 200 <= status < 300:
            return CallResult(
                status_code=status,
                failure=CallFailure.TOO_LARGE,
                message=f"participant answered {status} with a body over "
                f"{MAX_RESPONSE_BYTES} bytes; the response is not kept",
            )
        return CallResult(
            status_code=status,
            body=_parse_body(raw, response.headers.get("Content-Type", "")),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            message=_error_message(status, raw),
        )


async def read_limited(
    chunks: AsyncIterable[bytes], content_encoding: str, limit: int
) -> tuple[bytes, bool]:
    """The body, decompressed, and whether it went over `limit` bytes.

    Reads the raw stream and decompresses it here, never more than `limit` + 1 bytes
    of output at a time, so a small compressed body cannot inflate in memory (a gzip
    bomb costs at most `limit`). An encoding we cannot decode gives an empty body.
    """
    decoder = _decoder(content_encoding)
    out_chunks: list[bytes] = []
    size = 0
    async for chunk in chunks:
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
                return b"".join(out_chunks), True
            out_chunks.append(out)
    return b"".join(out_chunks), False


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


# What a request carries of a URL, as httpx wrote it (WHATWG's percent-encode sets):
# characters outside these are percent-encoded (as UTF-8), and an existing `%xx` stays as
# it is, so a value rendered into one segment (`%2E%2E%2F`) reaches the participant as
# rendered, never decoded into `../`.
_VISIBLE_ASCII = frozenset(chr(c) for c in range(0x21, 0x7F))
_PATH_KEPT = _VISIBLE_ASCII - frozenset('"#<>?`{}')
_QUERY_KEPT = _VISIBLE_ASCII - frozenset('"#<>')


def _target(url: str) -> tuple[URL, str, int]:
    """The URL as it goes on the wire (its fragment dropped, the written dot segments of
    its path resolved), and its host and port for the policy. ValueError if it is not an
    absolute http(s) URL with a host."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        raise ValueError("not an absolute http(s) URL with a host")
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = _encoded(_without_dot_segments(parts.path), _PATH_KEPT) or "/"
    query = f"?{_encoded(parts.query, _QUERY_KEPT)}" if parts.query else ""
    target = URL(f"{scheme}://{netloc}{path}{query}", encoded=True)
    return target, host, port or (443 if scheme == "https" else 80)


def _encoded(text: str, kept: frozenset[str]) -> str:
    if all(c in kept for c in text):
        return text
    return "".join(c if c in kept else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _without_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4: `/a/./b/../c` is `/a/c` (only what is written: a rendered value's
    dots are percent-encoded)."""
    segments = path.split("/")
    if "." not in segments and ".." not in segments:
        return path
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out and out != [""]:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/".join(out)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FRAMING = frozenset({"content-length", "transfer-encoding"})
# What `header_value_problem` lets through, as one regular expression (the fast path).
_SENDABLE_VALUE = re.compile(r"(?:[!-~](?:[\t -~]*[!-~])?)?")


def _header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent as it is, or None. aiohttp would write most of these
    anyway (or fail once connected): they are refused here, before anything is sent."""
    if not _TOKEN.fullmatch(name):
        return "is not a valid HTTP header name"
    if name.lower() in _FRAMING:
        # aiohttp would keep it and still send the body as it is: a message its
        # receiver cannot read.
        return "frames the body, which the client does itself"
    if _SENDABLE_VALUE.fullmatch(value):
        return None
    return header_value_problem(value) or "cannot be sent"


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
