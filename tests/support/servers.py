"""Real HTTP servers inside the test process: the orchestrator and scripted participants."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: Any, port: int | None = None) -> AsyncIterator[str]:
    """Run an ASGI app with uvicorn on 127.0.0.1 in this event loop; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)


@dataclass
class Reply:
    """One scripted answer: status, JSON body, headers, and a delay before answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    raw_path: bytes = b""  # as it came on the wire, still percent-encoded


class Participant:
    """A participant service: records every call; answers by script, else 200 + echo.

    It tracks how many calls are in flight at once (`max_in_flight`), for bulkhead tests.
    """

    def __init__(self) -> None:
        self.calls: list[Received] = []
        self.scripts: dict[str, list[Reply]] = {}
        self.defaults: dict[str, Reply] = {}
        self.raw_bodies: dict[str, bytes] = {}  # path -> bytes sent as they are
        self.in_flight = 0
        self.max_in_flight = 0
        # path -> coroutine run with the call before it is answered (a callback step's
        # participant reporting before its own answer, say).
        self.hooks: dict[str, Any] = {}
        self.app = Starlette(
            routes=[
                Route(
                    "/{path:path}", self._handle, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]
                )
            ]
        )
        self.url = ""

    def script(self, path: str, *replies: Reply) -> None:
        """Answer the next calls to `path` with these replies, in order."""
        self.scripts.setdefault(path, []).extend(replies)

    def always(self, path: str, reply: Reply) -> None:
        self.defaults[path] = reply

    def to(self, path: str) -> list[Received]:
        return [c for c in self.calls if c.path == path]

    async def _handle(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.calls.append(
            Received(
                request.method,
                path,
                dict(request.headers),
                body,
                time.monotonic(),
                request.scope.get("raw_path", b""),
            )
        )
        queue = self.scripts.get(path)
        reply = queue.pop(0) if queue else self.defaults.get(path, Reply())
        if path in self.hooks:
            await self.hooks[path](self.calls[-1])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
        finally:
            self.in_flight -= 1
        key = request.headers.get("idempotency-key", "")
        if path in self.raw_bodies:
            return Response(self.raw_bodies[path], status_code=reply.status, headers=reply.headers)
        body_out = reply.body if reply.body is not None else {"id": f"{path}-{key}", "echo": body}
        return Response(
            json.dumps(body_out),
            status_code=reply.status,
            headers=reply.headers,
            media_type="application/json",
        )


class ServerThread:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread's event loop, so
    the state machine itself can run synchronously."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.url = ""
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="participant", daemon=True)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self.app) as base:
            self.url = base
            self._started.set()
            await self._stop.wait()

    def start(self) -> str:
        self._thread.start()
        if not self._started.wait(20) or self._error is not None:
            raise AssertionError(f"participant did not start: {self._error!r}")
        return self.url

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
