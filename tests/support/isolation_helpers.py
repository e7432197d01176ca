"""Helpers for the failure-isolation tests: breakers, bulkheads and dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from app.core.states import WaitReason
from app.engine.ports import Lease
from app.main import build_executor, run_executor_until
from app.store.db import make_engine
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.servers import Participant, serve

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TERMINAL = ("completed", "compensated", "failed")


def fast_retry(max_attempts: int = 3, interval: float = 0.05) -> dict[str, Any]:
    """Many attempts, tiny fixed intervals, no jitter."""
    return {
        "max_attempts": max_attempts,
        "initial_interval_seconds": interval,
        "backoff_coefficient": 1.0,
        "max_interval_seconds": max(interval, 0.2),
        "jitter": False,
    }


def breaker(threshold: int = 1000, recovery: float = 30, half_open: int = 1) -> dict[str, Any]:
    return {
        "failure_threshold": threshold,
        "recovery_timeout_seconds": recovery,
        "half_open_max_calls": half_open,
    }


def call(service: str, path: str, body: Any = None) -> dict[str, Any]:
    return {"service": service, "path": path, "body": body}


async def put_service(
    client: httpx.AsyncClient, name: str, base_url: str, **extra: Any
) -> dict[str, Any]:
    r = await client.put(f"/v1/services/{name}", json={"base_url": base_url, **extra})
    assert r.status_code in (200, 201), r.text
    return r.json()


async def define(
    client: httpx.AsyncClient, name: str, steps: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    r = await client.post("/v1/definitions", json={"name": name, "steps": steps, **extra})
    assert r.status_code in (200, 201), r.text
    return r.json()


async def start(client: httpx.AsyncClient, definition: str, input: Any = None) -> dict[str, Any]:
    r = await client.post("/v1/sagas", json={"definition": definition, "input": input or {}})
    assert r.status_code == 201, r.text
    return r.json()


async def start_many(client: httpx.AsyncClient, definition: str, n: int) -> list[str]:
    sagas = await asyncio.gather(*(start(client, definition, {"n": i}) for i in range(n)))
    return [s["id"] for s in sagas]


async def saga(client: httpx.AsyncClient, saga_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sagas/{saga_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def service(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    r = await client.get(f"/v1/services/{name}")
    assert r.status_code == 200, r.text
    return r.json()


async def saga_events(client: httpx.AsyncClient, saga_id: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/sagas/{saga_id}/events", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def finish(client: httpx.AsyncClient, saga_id: str, seconds: float = 30) -> dict[str, Any]:
    """Long-poll a saga to a terminal status in short rounds.

    Rounds of at most 2 s: a long poll can miss its wake-up (see the report on
    `get_saga`), and a short round bounds what that costs.
    """
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        r = await client.get(
            f"/v1/sagas/{saga_id}", params={"wait_seconds": max(0.1, min(2.0, remaining))}
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        if doc["status"] in TERMINAL:
            return doc
        if time.monotonic() >= deadline:
            raise AssertionError(f"saga {saga_id} still {doc['status']} after {seconds}s")


async def audit(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/v1/admin/audit", params={"limit": 500}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def admin_actions(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """The audit log without registrations (services and definitions are audited too)."""
    return [e for e in await audit(client) if not e["action"].endswith(".register")]


async def dead_letters(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/admin/dead-letters", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def eventually(
    check: Callable[[], Awaitable[Any]],
    within: float = 20,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last={last!r}")
        await asyncio.sleep(interval)


async def wait_all_terminal(
    client: httpx.AsyncClient, ids: list[str], seconds: float = 40
) -> list[dict[str, Any]]:
    """Poll until every saga is terminal (one list call per round, not one per saga)."""
    wanted = set(ids)

    async def done() -> dict[str, dict[str, Any]] | None:
        found: dict[str, dict[str, Any]] = {}
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            r = await client.get("/v1/sagas", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            for item in page["items"]:
                if item["id"] in wanted:
                    found[item["id"]] = item
            cursor = page["next_cursor"]
            if not cursor:
                break
        if len(found) == len(wanted) and all(s["status"] in TERMINAL for s in found.values()):
            return found
        return None

    found = await eventually(done, within=seconds, interval=0.2, what="all sagas terminal")
    return [found[i] for i in ids]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def seconds_since(value: str) -> float:
    return (datetime.now(UTC) - parse_time(value)).total_seconds()


def latency(saga_doc: dict[str, Any]) -> float:
    """Seconds from creation to finish, by the database clock."""
    return (
        parse_time(saga_doc["finished_at"]) - parse_time(saga_doc["created_at"])
    ).total_seconds()


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass(eq=False)
class Span:
    """One call as the participant saw it, and the most calls in flight during it."""

    path: str
    started: float
    ended: float = 0.0
    peak: int = 0


class TimedParticipant(Participant):
    """A Participant that also records when each call was answered, and for each call
    the highest number of calls in flight at any moment while it was."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._active: set[Span] = set()
        super().__init__()

    async def _handle(self, request: Request) -> Response:
        span = Span("/" + request.path_params["path"], time.monotonic())
        self._active.add(span)
        for other in self._active:
            other.peak = max(other.peak, len(self._active))
        try:
            return await super()._handle(request)
        finally:
            span.ended = time.monotonic()
            self._active.discard(span)
            self.spans.append(span)


@contextlib.asynccontextmanager
async def participant_server(cls: type[Participant] = Participant) -> AsyncIterator[Any]:
    p = cls()
    async with serve(p.app) as base:
        p.url = base
        yield p


@dataclass
class ExtraExecutor:
    """An in-process executor on the test's database, recording the calls it was denied."""

    db_url: str
    worker_id: str
    concurrency: int | None = None  # SAGA_WORKER_CONCURRENCY (None: the default)
    denials: list[tuple[str, WaitReason]] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _engine: Any = None

    async def start(self) -> None:
        assert self._task is None
        self._engine = make_engine(self.db_url)

        def record(lease: Lease, reason: WaitReason) -> None:
            self.denials.append((str(lease.saga_id), reason))

        extra = {"SAGA_WORKER_CONCURRENCY": self.concurrency} if self.concurrency else {}
        ex = build_executor(
            make_settings(**extra), self._engine, worker_id=self.worker_id, on_denied=record
        )
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(
            run_executor_until(ex, self.db_url, self._stop), name=f"executor-{self.worker_id}"
        )

    async def stop(self) -> None:
        if self._task is None:
            return
        assert self._stop is not None
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, timeout=20)
        finally:
            self._task = None
            await self._engine.dispose()

    def denied(self, reason: WaitReason) -> set[str]:
        return {saga_id for saga_id, r in self.denials if r is reason}


@contextlib.asynccontextmanager
async def extra_executor(
    db_url: str, worker_id: str, concurrency: int | None = None
) -> AsyncIterator[ExtraExecutor]:
    ex = ExtraExecutor(db_url, worker_id, concurrency)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.stop()
