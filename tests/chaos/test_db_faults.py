"""PostgreSQL faults: the database server is restarted several times mid-run (clean
`fast` shutdowns and `immediate` ones, which are crashes) and every application
connection is cut with pg_terminate_backend, while sagas run and clients keep calling.

The server is a private one this test starts on its own port (tests.support.private_pg),
with three orchestrator processes on it: `serve` (API + executor), `worker` and `api`.
What must hold:

- while the database is down every API answer is 503 with Retry-After (never another
  5xx), and both API processes are ready again within 10 s of it coming back;
- no saga is lost: every saga a client was told about ends where it should; a start
  that got a 503 and is retried with its Idempotency-Key creates exactly one saga;
- no duplicate effect: each step's effect is applied under its one key (the crash
  suite's invariants), and work continues after the connections are terminated.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import Record, Scale
from tests.chaos.helpers import (
    collect,
    lost_to_the_database,
    parse_at,
    quantiles,
    query,
    report,
    start_many,
)
from tests.support.crash import (
    BAD_DEF,
    OK_DEF,
    SERVICE,
    Launcher,
    Proc,
    TrackingParticipant,
    check_run,
    client_for,
    register,
    summary,
)
from tests.support.private_pg import PrivatePostgres, private_postgres

pytestmark = pytest.mark.slow

PATHS = ("/a", "/b", "/c", "/c/bad", "/a/undo", "/b/undo", "/c/undo")
HEALTHY_WITHIN = 10.0
DATABASE = "chaos"


@dataclass
class Probe:
    at: float  # monotonic, when the request was sent
    target: str
    what: str
    status: int | None  # None: no HTTP answer at all
    retry_after: str | None
    seconds: float
    error: str | None = None


@dataclass
class Prober:
    """Clients that keep calling both APIs: starts (with Idempotency-Keys, retried until
    acknowledged) and reads. Every answer is kept for the checks."""

    clients: list[tuple[str, httpx.AsyncClient]]
    rng: random.Random
    probes: list[Probe] = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)  # saga id -> definition
    key_to_saga: dict[str, str] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)  # key -> n, not yet acknowledged
    known: list[str] = field(default_factory=list)  # ids to read
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set on each acknowledgement

    async def _send(
        self, target: str, client: httpx.AsyncClient, what: str, method: str, url: str, **kw: Any
    ) -> httpx.Response | None:
        started = time.monotonic()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.probes.append(
                Probe(started, target, what, None, None, time.monotonic() - started, repr(exc))
            )
            return None
        self.probes.append(
            Probe(
                started,
                target,
                what,
                r.status_code,
                r.headers.get("retry-after"),
                time.monotonic() - started,
                None if r.status_code < 500 else r.text[:300],
            )
        )
        return r

    async def start(self, n: int) -> bool:
        key = f"dbfault-{n}"
        definition = BAD_DEF if n % 2 else OK_DEF
        target, client = self.clients[n % len(self.clients)]
        r = await self._send(
            target,
            client,
            "POST /v1/sagas",
            "POST",
            "/v1/sagas",
            json={"definition": definition, "input": {"n": 100_000 + n, "bad": n % 2 == 1}},
            headers={"Idempotency-Key": key},
        )
        if r is not None and r.status_code in (200, 201):
            saga_id = r.json()["id"]
            previous = self.key_to_saga.setdefault(key, saga_id)
            assert previous == saga_id, f"{key} answered {previous} and then {saga_id}"
            self.acknowledged[saga_id] = definition
            self.known.append(saga_id)
            self.pending.pop(key, None)
            self.started.set()
            return True
        self.pending[key] = n
        return False

    async def start_loop(self, stop: asyncio.Event, interval: float) -> None:
        n = 0
        while not stop.is_set():
            for _key, m in list(self.pending.items())[:5]:
                await self.start(m)
            await self.start(n)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def finish_pending(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.pending:
            assert time.monotonic() < deadline, f"starts never acknowledged: {self.pending}"
            for m in list(self.pending.values()):
                await self.start(m)
            await asyncio.sleep(0.2)

    async def read_loop(self, target: str, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():
            choice = self.rng.randrange(4)
            if choice == 0:
                await self._send(target, client, "GET /readyz", "GET", "/readyz")
            elif choice == 1 and self.known:
                saga_id = self.rng.choice(self.known)
                await self._send(
                    target, client, "GET /v1/sagas/{id}", "GET", f"/v1/sagas/{saga_id}"
                )
            elif choice == 2:
                await self._send(
                    target, client, "GET /v1/sagas", "GET", "/v1/sagas", params={"limit": 5}
                )
            else:
                await self._send(
                    target, client, "GET /v1/services/{name}", "GET", f"/v1/services/{SERVICE}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


@dataclass
class Outage:
    mode: str
    down_at: float  # monotonic: shutdown requested
    up_at: float = 0.0  # monotonic: accepting connections again
    up_wall: datetime | None = None
    ready_seconds: dict[str, float] = field(default_factory=dict)  # API -> ready after up
    first_start_seconds: float | None = None  # first acknowledged start after up


async def _wait_ready(
    clients: list[tuple[str, httpx.AsyncClient]], since: float, seconds: float
) -> dict[str, float]:
    ready: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while len(ready) < len(clients) and time.monotonic() < deadline:
        for target, client in clients:
            if target in ready:
                continue
            with contextlib.suppress(httpx.HTTPError):
                r = await client.get("/readyz")
                if r.status_code == 200:
                    ready[target] = time.monotonic() - since
        await asyncio.sleep(0.05)
    return ready


def _terminate_all(pg: PrivatePostgres) -> int:
    rows = pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{DATABASE}' AND pid <> pg_backend_pid()"
    )
    return sum(1 for (ok,) in rows if ok)


async def test_database_restarts_and_terminated_connections(
    tracker: TrackingParticipant,
    launch: Callable[[str], Launcher],
    chaos_scale: Scale,
    figures: Record,
    seed: int,
) -> None:
    rng = random.Random(seed)
    tracker.jitter = dict.fromkeys(PATHS, (0.05, 0.2))
    with private_postgres() as pg:
        pg.execute(f"CREATE DATABASE {DATABASE}")
        db_url = pg.database_url(DATABASE)
        launcher = launch(db_url)
        try:
            server = await launcher.start_ready("serve", "serve", SAGA_WORKER_CONCURRENCY=8)
            worker, api = await asyncio.gather(
                launcher.start_ready("worker", "worker", SAGA_WORKER_CONCURRENCY=8),
                launcher.start_ready("api", "api"),
            )
            await _run(pg, db_url, server, worker, api, tracker, chaos_scale, figures, seed, rng)
        finally:
            launcher.close()  # before the database goes away


async def _run(
    pg: PrivatePostgres,
    db_url: str,
    server: Proc,
    worker: Proc,
    api: Proc,
    tracker: TrackingParticipant,
    scale: Scale,
    figures: Record,
    seed: int,
    rng: random.Random,
) -> None:
    began = time.monotonic()
    async with client_for(server) as c_server, client_for(api) as c_api:
        await register(c_server, tracker)
        r = await c_server.put(
            f"/v1/services/{SERVICE}", json={"base_url": tracker.url, "max_concurrency": 1000}
        )
        assert r.status_code in (200, 201), r.text
        initial = await start_many(c_server, scale.db_sagas, "dbfault-initial")

        clients = [("serve", c_server), ("api", c_api)]
        prober = Prober(clients, random.Random(seed + 1))
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(prober.start_loop(stop, 0.25)),
            *(asyncio.create_task(prober.read_loop(t, c, stop)) for t, c in clients),
        ]
        outages: list[Outage] = []
        terminated: list[int] = []
        terminated_at: list[datetime] = []
        faults = ["restart"] * scale.db_restarts + ["terminate"] * scale.db_terminations
        rng.shuffle(faults)
        try:
            for fault in faults:
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                if fault == "terminate":
                    terminated_at.append(datetime.now(UTC))
                    terminated.append(await asyncio.to_thread(_terminate_all, pg))
                    continue
                mode = "immediate" if len(outages) % 2 else "fast"
                outage = Outage(mode, time.monotonic())
                outages.append(outage)
                await asyncio.to_thread(pg.stop, mode)
                await asyncio.sleep(rng.uniform(1.5, 3.0))
                await asyncio.to_thread(pg.start)
                outage.up_at = time.monotonic()
                outage.up_wall = datetime.now(UTC)
                prober.started.clear()
                outage.ready_seconds = await _wait_ready(clients, outage.up_at, 30)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(prober.started.wait(), 30)
                    outage.first_start_seconds = time.monotonic() - outage.up_at
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*loops)
        await prober.finish_pending(30)

        sagas = {**initial, **prober.acknowledged}
        final, histories = await collect(c_server, sagas, 90 + len(sagas) * 0.1)
    elapsed = time.monotonic() - began

    # --- what the clients saw ---------------------------------------------------------
    windows = [(o.down_at, o.up_at) for o in outages]

    def during_outage(p: Probe) -> bool:
        return any(lo <= p.at <= hi for lo, hi in windows)

    answered = [p for p in prober.probes if p.status is not None]
    unavailable = [p for p in answered if p.status == 503]
    other_5xx = [
        p for p in answered if p.status is not None and p.status >= 500 and p.status != 503
    ]
    no_retry_after = [p for p in unavailable if not p.retry_after]
    no_answer = [p for p in prober.probes if p.status is None]
    unexpected_4xx = [
        p
        for p in answered
        if p.status is not None and 400 <= p.status < 500 and p.what != "GET /readyz"
    ]
    # After each restart: readiness, then the first acknowledged start.
    ready_after = [max(o.ready_seconds.values(), default=float("inf")) for o in outages]
    first_start = [o.first_start_seconds for o in outages]
    # Executors back at work: the first attempt started after the database came back.
    attempts_at = sorted(
        parse_at(e["at"])
        for events in histories.values()
        for e in events
        if e["type"] == "attempt_started"
    )
    work_resumed = []
    for o in outages:
        assert o.up_wall is not None
        later = [t for t in attempts_at if t >= o.up_wall]
        if later:
            work_resumed.append((later[0] - o.up_wall).total_seconds())
    after_termination = []
    for at in terminated_at:
        later = [t for t in attempts_at if t >= at]
        if later:
            after_termination.append((later[0] - at).total_seconds())

    # --- what became of the sagas -----------------------------------------------------
    problems = lost_to_the_database(
        check_run(sagas, final, histories, tracker, may_abandon=lambda _w: True), histories
    )
    rows = query(db_url, "SELECT idempotency_key, count(*) FROM sagas GROUP BY 1")
    per_key = {k: n for k, n in rows}
    duplicate_sagas = {k: n for k, n in per_key.items() if n > 1}
    unknown = sum(per_key.values()) - len(sagas)
    lost = [s for s in sagas if final[s]["status"] not in ("completed", "compensated")]
    effects: dict[str, int] = defaultdict(int)
    for rec in tracker.records:
        if rec.status is not None and rec.status < 300:
            effects[rec.key] += 1
    stats = summary(histories, tracker)
    alive = {p.name: p.popen.poll() is None for p in (server, worker, api)}

    figures(
        sagas=len(sagas),
        restarts=len(outages),
        restart_modes=[o.mode for o in outages],
        outage_seconds=[round(o.up_at - o.down_at, 2) for o in outages],
        terminations=len(terminated),
        connections_terminated=terminated,
        requests=len(prober.probes),
        answered_503=len(unavailable),
        answered_503_during_outage=sum(1 for p in unavailable if during_outage(p)),
        answered_5xx_other=len(other_5xx),
        missing_retry_after=len(no_retry_after),
        no_http_answer=len(no_answer),
        ready_after_restart_seconds=[round(s, 2) for s in ready_after],
        first_start_after_restart_seconds=[round(s, 2) if s else None for s in first_start],
        executor_resumed_seconds=quantiles(work_resumed),
        executor_resumed_after_termination_seconds=quantiles(after_termination),
        lost_sagas=len(lost),
        duplicate_sagas=len(duplicate_sagas),
        unknown_sagas=unknown,
        keys_called_again=stats["keys_called_again"],
        invariant_violations=len(problems),
        processes_alive=alive,
        seconds=round(elapsed, 1),
        seed=seed,
    )

    context = f"seed {seed}, faults {faults}"

    def show(ps: list[Probe]) -> str:
        return "\n".join(f"{p.target} {p.what} -> {p.status} {p.error or ''}" for p in ps[:15])

    assert not other_5xx, f"{context}: 5xx other than 503:\n{show(other_5xx)}"
    assert not no_retry_after, f"{context}: 503 without Retry-After:\n{show(no_retry_after)}"
    assert not no_answer, f"{context}: requests with no HTTP answer:\n{show(no_answer)}"
    assert not unexpected_4xx, f"{context}: 4xx answers:\n{show(unexpected_4xx)}"
    assert all(alive.values()), f"{context}: a process died: {alive}"
    assert any(during_outage(p) for p in unavailable), f"{context}: no 503 seen while down"
    assert all(s <= HEALTHY_WITHIN for s in ready_after), (
        f"{context}: not ready within {HEALTHY_WITHIN}s of the database coming back: "
        f"{[o.ready_seconds for o in outages]}"
    )
    assert all(s is not None and s <= HEALTHY_WITHIN for s in first_start), (
        f"{context}: starts not accepted within {HEALTHY_WITHIN}s after a restart: {first_start}"
    )
    assert not lost, f"{context}: sagas lost: {[(s, final[s]['status']) for s in lost[:10]]}"
    assert not duplicate_sagas, f"{context}: several sagas for one key: {duplicate_sagas}"
    assert unknown == 0, f"{context}: {unknown} sagas nobody was told about"
    assert not problems, report(problems, context)
    assert len(terminated) == scale.db_terminations and all(terminated), terminated
