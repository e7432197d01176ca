"""The load generators' side of the harness protocol: JSON lines on stdin and stdout.

The harness (bench/run.py) sends commands; the generator answers each with one line:

- `{"cmd": "run", "callers": N, ...}`: start N callers, each looping "run one saga to
  its end" until told to stop; answers `{"ok": true}` at once.
- `{"cmd": "stop"}`: callers finish the saga they are in and exit; answers
  `{"records": [[started, finished, status], ...], "errors": n, "error_samples": [...]}`
  with times from `time.monotonic()`, which every process on the machine shares, so the
  harness can keep exactly the sagas that finished inside its measurement window.
- `{"cmd": "count"}`: answers `{"finished": n}`, the sagas finished since `run`.
- `{"cmd": "ping"}`: answers `{"ok": true}` once the generator is ready.
- `{"cmd": "quit"}`: exit.

Other commands are the generator's own (see `extra` in `serve`). Nothing but answers
may go to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

RunOne = Callable[[], Awaitable[str]]
# Per caller: a context (its own HTTP client, connection, ...) yielding "run one saga".
CallerFactory = Callable[[Mapping[str, Any]], AbstractAsyncContextManager[RunOne]]
Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]


class Load:
    """N callers, each running sagas back to back until `stop`."""

    def __init__(self, factory: CallerFactory) -> None:
        self.factory = factory
        self.records: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self.error_count = 0
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, callers: int, options: Mapping[str, Any]) -> None:
        self.tasks = [asyncio.create_task(self._caller(options)) for _ in range(callers)]

    async def _caller(self, options: Mapping[str, Any]) -> None:
        async with self.factory(options) as run_one:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    status = await run_one()
                except Exception as exc:
                    self.error_count += 1
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    await asyncio.sleep(0.05)
                    continue
                self.records.append((started, time.monotonic(), status))

    async def stop(self, grace: float = 90.0) -> dict[str, Any]:
        self.stopping.set()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in self.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        return {
            "records": self.records,
            "errors": self.error_count,
            "error_samples": self.errors,
            "unfinished_callers": sum(1 for t in self.tasks if t.cancelled()),
        }


async def _lines() -> AsyncIterator[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip():
            yield json.loads(line)


def answer(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(factory: CallerFactory, extra: Mapping[str, Handler] | None = None) -> None:
    """Answer the harness's commands until `quit` or the end of stdin."""
    load: Load | None = None
    async for message in _lines():
        command = str(message.get("cmd"))
        try:
            if command == "run":
                if load is not None:
                    raise RuntimeError("already running")
                load = Load(factory)
                await load.start(int(message["callers"]), message)
                answer({"ok": True})
            elif command == "stop":
                if load is None:
                    raise RuntimeError("not running")
                result = await load.stop()
                load = None
                answer(result)
            elif command == "count":
                answer({"finished": len(load.records) if load is not None else 0})
            elif command == "ping":
                answer({"ok": True})
            elif command == "quit":
                break
            elif extra and command in extra:
                answer(await extra[command](message))
            else:
                raise RuntimeError(f"unknown command {command!r}")
        except Exception as exc:
            answer({"error": f"{type(exc).__name__}: {exc}"})
    if load is not None:
        await load.stop(grace=5)
