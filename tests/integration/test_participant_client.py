"""The participant client on its own, against raw TCP servers on 127.0.0.1: one attempt
is one send, the host policy holds for IP literals and for every resolved address, and
each way a call can fail comes back as the failure kind the engine relies on.

A raw server (not an HTTP framework) lets a test see every byte and every connection:
what was sent, on which connection, and that nothing was sent at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import json
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from app.core.hosts import HostPolicy, IPAddress
from app.core.outcome import CallFailure
from app.core.requests import HttpRequest
from app.participants.client import MAX_RESPONSE_BYTES, ParticipantClient, _target

LOOPBACK = ipaddress.ip_address("127.0.0.1")
METADATA = ipaddress.ip_address("169.254.169.254")


@dataclass
class Seen:
    connection: int
    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


# Given the request's number on its connection (1, 2, ...) and what was read, the bytes
# to answer with; None closes the connection without an answer.
Answer = Callable[[int, Seen], Awaitable[bytes | None]]


@dataclass
class RawServer:
    answer: Answer
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        number = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen = Seen(connection, head, b"")
                length = seen.header("content-length")
                if length:
                    seen.body = await reader.readexactly(int(length))
                self.seen.append(seen)
                number += 1
                out = await self.answer(number, seen)
                if out is None:
                    return
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def raw_server(answer: Answer) -> AsyncIterator[RawServer]:
    server = RawServer(answer)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        listening.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listening.wait_closed(), 5)


def reply(status: int = 200, body: bytes = b'{"ok":true}', **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ok(_number: int, _seen: Seen) -> bytes:
    return reply(Content_Type="application/json")


class StubResolver:
    def __init__(self, answers: dict[str, list[IPAddress]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return self.answers[host]


def request(url: str, method: str = "POST", timeout: float = 5.0, **headers: str) -> HttpRequest:
    body = None if method in ("GET", "DELETE") else {"n": 1}
    all_headers = {"Content-Type": "application/json", **headers}
    return HttpRequest(method, url, all_headers, body, timeout)


@contextlib.asynccontextmanager
async def client(policy: str = "*", **names: list[IPAddress]) -> AsyncIterator[ParticipantClient]:
    c = ParticipantClient(HostPolicy.parse(policy), StubResolver(dict(names)))
    try:
        yield c
    finally:
        await c.aclose()


# --- one attempt is one send -----------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
async def test_a_request_on_a_kept_alive_connection_the_server_closed_is_not_sent_again(
    method: str,
) -> None:
    """aiohttp sends these methods again, on a new connection, when a kept-alive
    connection turns out closed; the participant may then have received it twice."""

    async def answer_once_per_connection(number: int, _seen: Seen) -> bytes | None:
        return reply(Content_Type="application/json") if number == 1 else None

    async with raw_server(answer_once_per_connection) as server, client() as c:
        first = await c.call(request(server.url + "/pay", method))
        assert first.status_code == 200, first
        second = await c.call(request(server.url + "/pay", method))
        assert second.failure is CallFailure.CONNECTION_LOST, second
        # Both went out on the one kept-alive connection, and the second went out once.
        assert [s.connection for s in server.seen] == [1, 1], server.seen
        assert server.connections == 1
        # The next attempt (the engine's decision) opens a new connection.
        third = await c.call(request(server.url + "/pay", method))
        assert third.status_code == 200, third
        assert [s.connection for s in server.seen] == [1, 1, 2]


# --- the host policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:169.254.169.254]/latest",
        "http://[fd00:ec2::254]/",
        "http://0xa9fea9fe/latest",
        "http://0.0.0.0:9/",
        "http://[fe80::1]:9/",
    ],
)
async def test_a_refused_ip_literal_is_blocked_before_any_connection(url: str) -> None:
    resolver = StubResolver({})
    c = ParticipantClient(HostPolicy.parse("*"), resolver)
    try:
        result = await c.call(request(url))
    finally:
        await c.aclose()
    assert result.failure is CallFailure.BLOCKED, result
    assert result.message.startswith("not sent: "), result
    assert resolver.asked in ([], ["0xa9fea9fe"])


async def test_an_ip_literal_outside_the_patterns_is_blocked_and_nothing_is_sent() -> None:
    async with raw_server(ok) as server, client("10.0.0.0/8") as c:
        result = await c.call(request(server.url + "/a"))
    assert result.failure is CallFailure.BLOCKED, result
    assert "SAGA_ALLOWED_HOSTS" in result.message
    assert server.connections == 0


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [([METADATA], "metadata"), ([LOOPBACK, METADATA], "metadata")],
)
async def test_a_name_resolving_to_a_refused_address_is_blocked(
    addresses: list[IPAddress], expected: str
) -> None:
    async with raw_server(ok) as server, client(**{"pay.example.test": addresses}) as c:
        port = server.url.rsplit(":", 1)[1]
        result = await c.call(request(f"http://pay.example.test:{port}/a"))
    assert result.failure is CallFailure.BLOCKED, result
    assert expected in result.message
    assert server.connections == 0


async def test_a_name_goes_to_its_checked_address_with_the_name_kept() -> None:
    resolver = StubResolver({"pay.example.test": [LOOPBACK]})
    c = ParticipantClient(HostPolicy.parse("*.example.test"), resolver)
    try:
        async with raw_server(ok) as server:
            port = server.url.rsplit(":", 1)[1]
            result = await c.call(request(f"http://Pay.Example.Test:{port}/a"))
            again = await c.call(request(f"http://pay.example.test:{port}/a"))
    finally:
        await c.aclose()
    assert result.status_code == 200 and again.status_code == 200, (result, again)
    assert [s.header("host") for s in server.seen] == [f"pay.example.test:{port}"] * 2
    # The second call reused the connection: nothing to resolve.
    assert resolver.asked == ["pay.example.test"]


async def test_a_name_that_does_not_resolve_is_a_connect_failure() -> None:
    async with client() as c:
        result = await c.call(request("http://nowhere.example.test/a"))
    assert result.failure is CallFailure.CONNECT, result
    assert result.message == "cannot connect: cannot resolve nowhere.example.test (OSError)"


# --- failures before and after sending --------------------------------------------------


async def test_a_refused_connection_is_a_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client() as c:
        result = await c.call(request(f"http://127.0.0.1:{port}/a"))
    assert result.failure is CallFailure.CONNECT, result
    assert result.message.startswith("cannot connect: "), result


async def test_no_answer_in_time_is_a_timeout() -> None:
    async def never(_number: int, _seen: Seen) -> bytes:
        await asyncio.sleep(30)
        return b""

    async with raw_server(never) as server, client() as c:
        began = time.monotonic()
        result = await c.call(request(server.url + "/a", timeout=0.3))
        took = time.monotonic() - began
    assert result.failure is CallFailure.TIMEOUT, result
    assert result.message == "no answer within 0.3s"
    assert took < 2, took


async def test_a_connection_closed_before_the_answer_is_lost() -> None:
    async def hang_up(_number: int, _seen: Seen) -> None:
        return None

    async with raw_server(hang_up) as server, client() as c:
        result = await c.call(request(server.url + "/a"))
    assert result.failure is CallFailure.CONNECTION_LOST, result
    assert len(server.seen) == 1


async def test_a_worker_paused_past_its_lease_sends_nothing() -> None:
    async with raw_server(ok) as server, client() as c:
        result = await c.call(request(server.url + "/a"), send_by=time.monotonic() - 1)
    assert result.failure is CallFailure.CONNECT, result
    assert result.message == "not sent: this worker was paused past its lease"
    assert server.connections == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Note": "a\r\nX-Injected: 1"},
        {"X-Note": "line\nbreak"},
        {"X-Name": "Zoë"},
        {"X-Name": "日本"},
        {"X Bad": "v"},
        {"Transfer-Encoding": "chunked"},
    ],
)
async def test_a_header_that_cannot_be_sent_is_a_template_failure(
    headers: dict[str, str],
) -> None:
    async with raw_server(ok) as server, client() as c:
        result = await c.call(request(server.url + "/a", **headers))
    assert result.failure is CallFailure.TEMPLATE, result
    assert result.message.endswith("nothing was sent"), result
    assert server.connections == 0


@pytest.mark.parametrize("url", ["not a url", "ftp://127.0.0.1/x", "http://127.0.0.1:99999/"])
async def test_a_url_that_cannot_be_sent_is_a_template_failure(url: str) -> None:
    async with client() as c:
        result = await c.call(request(url))
    assert result.failure is CallFailure.TEMPLATE, result
    assert result.message.endswith("nothing was sent"), result


# --- what is sent and how the answer is read --------------------------------------------


async def test_a_redirect_is_returned_not_followed() -> None:
    async def moved(_number: int, _seen: Seen) -> bytes:
        return reply(302, b'{"moved":true}', Location="/elsewhere", Content_Type="application/json")

    async with raw_server(moved) as server, client() as c:
        result = await c.call(request(server.url + "/a"))
    assert result.status_code == 302 and result.body == {"moved": True}, result
    assert [s.request_line for s in server.seen] == ["POST /a HTTP/1.1"]


async def test_what_goes_out_is_the_request_as_built() -> None:
    async with raw_server(ok) as server, client() as c:
        result = await c.call(request(server.url + "/o/%2E%2E%2Fx/s?t=%41", **{"X-Step": "a"}))
    assert result.status_code == 200, result
    (seen,) = server.seen
    assert seen.request_line == "POST /o/%2E%2E%2Fx/s?t=%41 HTTP/1.1"
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("content-type") == "application/json"
    assert seen.header("x-step") == "a"
    assert json.loads(seen.body) == {"n": 1}


async def test_no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    async with raw_server(ok) as server, client() as c:
        result = await c.call(request(server.url + "/a"))
    assert result.status_code == 200, result


async def test_a_participants_cookie_is_not_sent_back() -> None:
    async def with_cookie(_number: int, _seen: Seen) -> bytes:
        return reply(Set_Cookie="sid=abc; Path=/", Content_Type="application/json")

    async with raw_server(with_cookie) as server, client() as c:
        for _ in range(2):
            assert (await c.call(request(server.url + "/a"))).status_code == 200
    assert [s.header("cookie") for s in server.seen] == [None, None]


async def test_a_compressed_body_is_decompressed_here() -> None:
    async def compressed(number: int, _seen: Seen) -> bytes:
        if number == 1:
            body = gzip.compress(b'{"g":1}')
            return reply(body=body, Content_Encoding="gzip", Content_Type="application/json")
        body = zlib.compress(b'{"d":1}')
        return reply(body=body, Content_Encoding="deflate", Content_Type="application/json")

    async with raw_server(compressed) as server, client() as c:
        first = await c.call(request(server.url + "/a"))
        second = await c.call(request(server.url + "/a"))
    assert (first.body, second.body) == ({"g": 1}, {"d": 1})


async def test_a_gzip_bomb_is_cut_at_the_limit() -> None:
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = b"\0" * (1 << 20)
    bomb = b"".join([deflate.compress(zeros) for _ in range(64)] + [deflate.flush()])

    async def bomb_answer(_number: int, _seen: Seen) -> bytes:
        return reply(body=bomb, Content_Encoding="gzip", Content_Type="application/json")

    async with raw_server(bomb_answer) as server, client() as c:
        result = await c.call(request(server.url + "/a"))
    assert result.failure is CallFailure.TOO_LARGE, result
    assert str(MAX_RESPONSE_BYTES) in result.message


async def test_an_unknown_encoding_gives_no_body_and_retry_after_is_read() -> None:
    async def busy(number: int, _seen: Seen) -> bytes:
        if number == 1:
            return reply(body=b"\x00\x01", Content_Encoding="br", Content_Type="application/json")
        return reply(503, b"busy", Retry_After="7")

    async with raw_server(busy) as server, client() as c:
        first = await c.call(request(server.url + "/a"))
        second = await c.call(request(server.url + "/a"))
    assert first.status_code == 200 and first.body is None, first
    assert second.status_code == 503 and second.retry_after == 7.0, second
    assert second.message == "participant answered 503: busy"


@pytest.mark.parametrize(
    "url",
    [
        "http://x.test/o/%2E%2E%2F%2E%2E%2Fadmin%2Fwipe%3Fall%3D1%23/s?tag=%2E%2E%2F%41",
        "http://x.test/o/%252e%252e%252f/s",
        "http://X.Test:8080/a/./b/../c/..?q=1#frag",
        "http://x.test/café/ü?q=é&z=ö",
        'http://x.test/a|b{c}`d"e<f>^g\\h?x=|{}"`^\'',
        "http://x.test/a%zzb%?q=%",
        "http://x.test?x=1",
        "http://x.test",
        "http://[::1]:9000/v6",
    ],
)
def test_the_url_goes_out_as_httpx_sent_it(url: str) -> None:
    target, host, port = _target(url)
    expected = httpx.URL(url)
    assert target.raw_path_qs.encode() == expected.raw_path
    assert host == expected.host
    assert port == (expected.port or 80)
