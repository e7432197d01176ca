"""`saga-orchestrator demo`: the classic checkout problem, solved in front of you.

Payment succeeded, order creation failed: refund the payment. The demo starts the
database (embedded unless DATABASE_URL is set), four participant services from
`examples.checkout` in this process, and the orchestrator as a real `serve` subprocess;
then it breaks things on purpose and shows each saga ending where it should:

  (a) three happy checkouts complete;
  (b) orders refuses the order: the saga compensates and the payment is refunded;
  (c) notifications is down: the order still completes, the receipt is dead-lettered;
  (d) inventory fails and slows down: its circuit opens, closes again, sagas complete;
  (e) the orchestrator is SIGKILLed with sagas in flight: restarted, it finishes them,
      and every participant applied each effect exactly once.

Then it prints a report and keeps everything running until Ctrl-C (`--exit` stops at
once; the exit status says whether every scenario passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI

from app import logs
from app.client import TERMINAL, ApiError, SagaClient
from app.settings import Settings, libpq_url
from app.store.db import Database
from app.store.migrate import upgrade

log = logging.getLogger(__name__)

PARTICIPANTS = ("payments", "orders", "inventory", "notifications")
DEFINITION = "checkout"
LEASE_SECONDS = 3


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long things take; `--fast` shrinks them for the tests."""

    slow_call: float  # participant delay while the orchestrator gets killed (e)
    inventory_delay: float  # inventory's slowness while it fails (d)
    recovery_timeout: float  # inventory's circuit breaker (d)
    pause: float  # between scenarios, so that a person can follow along


FAST = Timing(slow_call=0.5, inventory_delay=0.2, recovery_timeout=1.5, pause=0.0)
NORMAL = Timing(slow_call=0.8, inventory_delay=0.3, recovery_timeout=3.0, pause=0.8)


def say(text: str = "", out: TextIO | None = None) -> None:
    print(text, file=out or sys.stdout, flush=True)


# --- entry point -----------------------------------------------------------------------


def run_demo(settings: Settings, port: int, fast: bool = False, exit_after: bool = False) -> int:
    """Run the demo; the exit status is 0 when every scenario passed."""
    # The demo talks to a person: its own lines on stdout, only warnings from libraries.
    logs.configure("console", "WARNING")
    if not _port_free(port):
        say(f"Port {port} is already in use; choose another one with --port.", sys.stderr)
        return 2
    say("Saga orchestrator demo: checkout = charge the card, score fraud, create the order,")
    say("reserve stock, email a receipt. Then we break things and watch every order end")
    say("consistent.\n")
    if settings.database_url:
        say(f"  database      {_redact(settings.database_url)} (DATABASE_URL)")
    else:
        say(f"  database      starting embedded PostgreSQL in {settings.data_dir.resolve()} ...")
    from app.cli import start_database, stop_database

    database: Database | None = None
    try:
        database = start_database(settings)
        upgrade(database.url)
        log_path = settings.data_dir.resolve() / "demo-orchestrator.log"
        timing = FAST if fast else NORMAL
        return asyncio.run(_main(settings, log_path, database, port, timing, exit_after))
    except (KeyboardInterrupt, SystemExit):
        say("\nStopped.")
        return 0  # stopped on request (Ctrl-C or SIGTERM before the scenarios ran)
    finally:
        if database is not None:
            embedded = database.embedded is not None
            stop_database(database)
            if embedded:
                say("Embedded PostgreSQL stopped.")


async def _main(
    settings: Settings,
    log_path: Path,
    database: Database,
    port: int,
    timing: Timing,
    exit_after: bool,
) -> int:
    """Run the demo as a task that Ctrl-C / SIGTERM cancels; clean up either way."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = _Outcome()
    try:
        async with contextlib.AsyncExitStack() as stack:
            work = asyncio.create_task(
                _demo(settings, log_path, database, port, timing, exit_after, stack, state, stop)
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not work.done():
                say("\nStopping ...")
                work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
            except (DemoError, ApiError, httpx.HTTPError) as exc:
                say(f"\nThe demo could not go on: {exc}", sys.stderr)
                state.code = 1
            # The exit stack now stops the orchestrator and the participants.
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)  # shutting down: the database stops next
    # Stopped by a signal before the report: that is what was asked for, not a failure.
    return 0 if state.code is None else state.code


@dataclass
class _Outcome:
    code: int | None = None  # set once the report is printed (or the demo failed)


async def _demo(
    settings: Settings,
    log_path: Path,
    database: Database,
    port: int,
    timing: Timing,
    exit_after: bool,
    stack: contextlib.AsyncExitStack,
    outcome: _Outcome,
    stop: asyncio.Event,
) -> None:
    token = settings.admin_token or secrets.token_hex(16)
    urls: dict[str, str] = {}
    from examples.checkout import FACTORIES  # the example is not needed by `serve`

    dsn = libpq_url(database.url)
    for name in PARTICIPANTS:
        urls[name] = await _start_participant(FACTORIES[name](dsn), name, stack)
    say("  participants  " + "  ".join(f"{n} {u}" for n, u in urls.items()))

    orchestrator = Orchestrator(port, database.url, token, log_path)
    stack.push_async_callback(orchestrator.stop)
    orchestrator.start()
    await orchestrator.wait_ready()
    say(f"  orchestrator  {orchestrator.url} (pid {orchestrator.pid}; its log: {log_path})")

    client = await stack.enter_async_context(SagaClient(orchestrator.url, token))
    http = await stack.enter_async_context(
        httpx.AsyncClient(timeout=30, headers={"Authorization": f"Bearer {token}"})
    )
    demo = Demo(client, http, urls, orchestrator, timing, run=uuid.uuid4().hex[:8])
    await demo.register()
    say(f"  registered    services {', '.join(PARTICIPANTS)}; definition '{DEFINITION}'")

    results: list[Result] = []
    for key, title, scenario in SCENARIOS:
        results.append(await demo.play(key, title, scenario))
        await asyncio.sleep(timing.pause)
    _report(results, orchestrator.url, token)
    passed = all(r.passed for r in results)
    outcome.code = 0 if passed else 1
    if exit_after:
        return
    _try_it(orchestrator.url, token, urls)
    while orchestrator.alive and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
    if not orchestrator.alive:
        say(f"\nThe orchestrator exited (code {orchestrator.returncode}); see {log_path}.")


# --- processes and servers -------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the demo owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _start_participant(app: FastAPI, name: str, stack: contextlib.AsyncExitStack) -> str:
    """Serve an app on a free 127.0.0.1 port in this event loop; returns its URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, lifespan="on", access_log=False
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(), name=f"participant-{name}")

    async def shutdown() -> None:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, timeout=10)

    stack.push_async_callback(shutdown)
    while not server.started:
        if task.done():
            task.result()
            raise DemoError(f"the {name} participant did not start (see the errors above)")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Orchestrator:
    """`python -m app serve` as a child process, against the demo's database."""

    def __init__(self, port: int, database_url: str, admin_token: str, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.database_url = database_url
        self.admin_token = admin_token
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("SAGA_FAILPOINT", None)
        env.setdefault("SAGA_LOG_FORMAT", "console")
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "SAGA_ADMIN_TOKEN": self.admin_token,
                "SAGA_LEASE_SECONDS": str(LEASE_SECONDS),
                "SAGA_POLL_INTERVAL": "0.25",
                "SAGA_SHUTDOWN_GRACE": "3",
                "SAGA_ALLOWED_HOSTS": "127.0.0.1",  # the participants live here, nowhere else
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "app", "serve", "--port", str(self.port)]
        with self.log_path.open("ab") as out:
            out.write(f"\n$ {' '.join(args)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, within: float = 90.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if not self.alive:
                    raise DemoError(
                        f"the orchestrator exited with code {self.returncode}; see {self.log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/readyz")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise DemoError(f"the orchestrator is not ready after {within:.0f}s")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no drain, leases left behind."""
        if self.process is not None and self.alive:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, a graceful drain, then SIGKILL if it takes too long."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(process.wait, 15)
        if process.poll() is None:
            process.kill()
            process.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


# --- the scenarios ---------------------------------------------------------------------


@dataclass
class Result:
    key: str
    title: str
    passed: bool = True
    summary: str = ""
    saga_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Check(DemoError):
    """A scenario's expectation did not hold."""


class Demo:
    """What the scenarios use: the orchestrator's API, the participants, timing."""

    def __init__(
        self,
        client: SagaClient,
        http: httpx.AsyncClient,
        urls: dict[str, str],
        orchestrator: Orchestrator,
        timing: Timing,
        run: str,
    ) -> None:
        self.client = client
        self.http = http
        self.urls = urls
        self.orchestrator = orchestrator
        self.timing = timing
        self.run = run
        self.result = Result("", "")
        self.started_at = time.monotonic()

    # --- setup -----------------------------------------------------------------------

    async def register(self) -> None:
        from examples.checkout import CHECKOUT, service_specs

        specs = service_specs(self.urls, recovery_timeout_seconds=self.timing.recovery_timeout)
        for name, spec in specs.items():
            await self.client.put_service(name, spec)
            # A breaker left open by an earlier, interrupted run starts closed again.
            await self.api("POST", f"/v1/admin/services/{name}/circuit/reset")
        await self.client.register_definition(CHECKOUT)

    # --- running a scenario ----------------------------------------------------------

    async def play(
        self, key: str, title: str, scenario: Callable[[Demo], Awaitable[str]]
    ) -> Result:
        self.result = Result(key, title)
        self.started_at = time.monotonic()
        say(f"\n({key}) {title}")
        try:
            self.result.summary = await scenario(self)
        except Check as exc:
            self.result.problems.append(str(exc))
        except (ApiError, TimeoutError, httpx.HTTPError, OSError, KeyError) as exc:
            self.result.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            await self.heal()
            if not self.orchestrator.alive:  # whatever happened, keep it serving
                self.orchestrator.start()
                await self.orchestrator.wait_ready()
        self.result.passed = not self.result.problems
        for problem in self.result.problems:
            say(f"    FAILED: {problem}")
        if self.result.passed:
            say(f"    ok: {self.result.summary}")
        return self.result

    def step(self, text: str) -> None:
        say(f"    {time.monotonic() - self.started_at:5.1f}s  {text}")

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.result.problems.append(problem)

    # --- the orchestrator ------------------------------------------------------------

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """An orchestrator call that survives a restart's dropped connections."""
        for attempt in range(20):
            try:
                response = await self.http.request(method, self.orchestrator.url + path, **kwargs)
            except httpx.TransportError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.25)
                continue
            if response.status_code >= 400:
                raise Check(f"{method} {path} answered {response.status_code}: {response.text}")
            return response.json()
        raise AssertionError("unreachable")  # pragma: no cover

    async def start(self, label: str, count: int) -> list[str]:
        """Start `count` checkouts at once; returns the saga ids."""

        async def one(i: int) -> str:
            started = await self.client.start_saga(
                DEFINITION, order_input(i), idempotency_key=f"demo-{self.run}-{label}-{i}"
            )
            return str(started.saga["id"])

        ids = list(await asyncio.gather(*(one(i) for i in range(count))))
        self.result.saga_ids.extend(ids)
        return ids

    async def finish(self, ids: list[str], within: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every saga is terminal."""
        return list(await asyncio.gather(*(self.client.wait(i, within=within) for i in ids)))

    async def circuit(self, service: str) -> str:
        state: str = (await self.api("GET", f"/v1/services/{service}"))["circuit_state"]
        return state

    # --- the participants ------------------------------------------------------------

    async def chaos(self, service: str, **settings: Any) -> None:
        response = await self.http.post(f"{self.urls[service]}/_chaos", json=settings)
        response.raise_for_status()

    async def heal(self) -> None:
        for service in PARTICIPANTS:
            with contextlib.suppress(httpx.HTTPError):
                await self.chaos(service)

    async def effects(self, service: str, order_ref: str | None = None) -> dict[str, int]:
        params = {"order_ref": order_ref} if order_ref else {}
        response = await self.http.get(f"{self.urls[service]}/_effects", params=params)
        response.raise_for_status()
        counts: dict[str, int] = response.json()["counts"]
        return counts

    async def replays(self) -> int:
        total = 0
        for service in PARTICIPANTS:
            response = await self.http.get(f"{self.urls[service]}/_effects")
            response.raise_for_status()
            total += int(response.json()["replayed_requests"])
        return total

    async def effects_of(self, order_ref: str) -> dict[str, int]:
        """Every participant's counts for one order, in one flat dict."""
        merged: dict[str, int] = {}
        for service in PARTICIPANTS:
            merged.update(await self.effects(service, order_ref))
        return merged

    async def exactly_once(self, ids: list[str]) -> None:
        """Each completed order: charged, created, reserved and emailed exactly once."""
        for saga_id in ids:
            counts = await self.effects_of(saga_id)
            for name in ("charges", "orders", "reservations", "emails"):
                self.expect(
                    counts[name] == 1, f"order {saga_id[:8]} has {counts[name]} {name}, not 1"
                )
            for name in ("charges_refunded", "orders_cancelled", "reservations_released"):
                self.expect(counts[name] == 0, f"order {saga_id[:8]} has {counts[name]} {name}")


def order_input(i: int) -> dict[str, Any]:
    customers = ("ada", "grace", "alan", "edsger", "barbara", "ken", "margaret", "dennis")
    name = customers[i % len(customers)]
    return {
        "amount": round(19.9 + 7.5 * i, 2),
        "items": [{"sku": "coffee-beans-1kg", "qty": 1 + i % 3}],
        "email": f"{name}@example.com",
    }


def tally(statuses: list[str]) -> str:
    """ "3 completed" or "2 completed, 1 compensated"."""
    counts = Counter(statuses)
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def step_status(saga: dict[str, Any], step: str) -> str:
    status: str = next(s["status"] for s in saga["steps"] if s["name"] == step)
    return status


def current_step(saga: dict[str, Any]) -> str:
    for s in saga["steps"]:
        if s["status"] not in ("succeeded", "fallback", "failed"):
            name: str = s["name"]
            return name
    return "-"


async def happy_path(demo: Demo) -> str:
    began = time.monotonic()
    ids = await demo.start("happy", 3)
    demo.step("3 checkouts started")
    sagas = await demo.finish(ids)
    took = time.monotonic() - began
    statuses = [s["status"] for s in sagas]
    demo.step(f"{tally(statuses)} in {took:.1f}s")
    demo.expect(statuses == ["completed"] * 3, f"expected 3 completed, got {statuses}")
    for saga in sagas:
        bad = [s["name"] for s in saga["steps"] if s["status"] != "succeeded"]
        demo.expect(not bad, f"saga {saga['id'][:8]}: steps not succeeded: {bad}")
    await demo.exactly_once(ids)
    demo.step("each order charged once, created once, stock reserved once, receipt sent once")
    again = await demo.client.start_saga(
        DEFINITION, order_input(0), idempotency_key=f"demo-{demo.run}-happy-0"
    )
    demo.expect(
        again.replayed and again.saga["id"] == ids[0],
        "the same Idempotency-Key started a second saga",
    )
    demo.step("the first checkout sent again with its Idempotency-Key: same saga, no new charge")
    return "3 checkouts completed"


async def order_fails(demo: Demo) -> str:
    await demo.chaos("orders", fail_status=400)
    demo.step("orders now answers 400 to every request")
    (saga_id,) = await demo.start("refund", 1)
    (saga,) = await demo.finish([saga_id])
    charge = step_status(saga, "charge_payment")
    order = step_status(saga, "create_order")
    code = next(s["status_code"] for s in saga["steps"] if s["name"] == "create_order")
    demo.step(f"saga {saga['status']}: create_order {order} ({code}), charge_payment {charge}")
    demo.expect(saga["status"] == "compensated", f"saga is {saga['status']}, not compensated")
    demo.expect(order == "failed", f"create_order is {order}, not failed")
    demo.expect(charge == "compensated", f"charge_payment is {charge}, not compensated")
    payments = await demo.effects("payments", saga_id)
    orders = await demo.effects("orders", saga_id)
    demo.step(
        f"payments: {payments['charges']} charge, {payments['refunds']} refund; "
        f"orders: {orders['orders']} orders"
    )
    demo.expect(payments["charges"] == 1, f"{payments['charges']} charges, not 1")
    demo.expect(
        payments["charges_refunded"] == 1 and payments["refunds"] == 1,
        f"the charge was not refunded ({payments})",
    )
    demo.expect(orders["orders"] == 0, f"{orders['orders']} orders were created")
    return "payment succeeded, order failed -> compensated, payment refunded"


async def notifications_down(demo: Demo) -> str:
    await demo.chaos("notifications", fail_status=503)
    demo.step("notifications now answers 503 (down)")
    (saga_id,) = await demo.start("no-email", 1)
    (saga,) = await demo.finish([saga_id])
    receipt = step_status(saga, "send_receipt")
    demo.step(f"saga {saga['status']}; send_receipt {receipt} after retries")
    demo.expect(saga["status"] == "completed", f"saga is {saga['status']}, not completed")
    demo.expect(receipt == "failed", f"send_receipt is {receipt}, not failed")
    letters = await demo.api(
        "GET",
        "/v1/admin/dead-letters",
        params={"status": "open", "definition": DEFINITION, "service": "notifications"},
    )
    mine = [d for d in letters["items"] if d["saga_id"] == saga_id]
    demo.expect(
        len(mine) == 1 and mine[0]["step"] == "send_receipt",
        f"expected one open dead letter for send_receipt, found {mine}",
    )
    if mine:
        demo.step(
            f"dead letter {mine[0]['id'][:8]} holds send_receipt ({mine[0]['attempts']} attempts)"
            " for an operator to retry"
        )
    counts = await demo.effects_of(saga_id)
    demo.expect(counts["orders"] == 1 and counts["charges_refunded"] == 0, f"effects: {counts}")
    return "receipt failed -> order still completed, dead letter for send_receipt"


async def inventory_flaky(demo: Demo) -> str:
    timing = demo.timing
    await demo.chaos("inventory", fail_status=503, delay_seconds=timing.inventory_delay)
    demo.step(f"inventory now answers 503 after {timing.inventory_delay}s")
    ids = await demo.start("breaker", 4)
    deadline = time.monotonic() + 30
    while (state := await demo.circuit("inventory")) != "open":
        if time.monotonic() > deadline:
            raise Check(f"inventory's circuit never opened (it is {state})")
        await asyncio.sleep(0.1)
    demo.step(
        "inventory's circuit is open: no calls go there; sagas wait without spending attempts"
    )
    await asyncio.sleep(min(1.0, timing.recovery_timeout / 2))
    await demo.chaos("inventory")
    demo.step("inventory recovered")
    deadline = time.monotonic() + 30
    seen = {"open"}
    while (state := await demo.circuit("inventory")) != "closed":
        seen.add(state)
        if time.monotonic() > deadline:
            raise Check(f"inventory's circuit did not close again (it is {state})")
        await asyncio.sleep(0.1)
    via = " via half_open" if "half_open" in seen else ""
    demo.step(f"after {timing.recovery_timeout:g}s a probe call succeeded: circuit closed{via}")
    sagas = await demo.finish(ids)
    statuses = [s["status"] for s in sagas]
    demo.step(f"the waiting sagas went on: {tally(statuses)}")
    demo.expect(statuses == ["completed"] * 4, f"expected 4 completed, got {statuses}")
    await demo.exactly_once(ids)
    return "circuit opened, then closed; 4 sagas completed"


async def orchestrator_killed(demo: Demo) -> str:
    slow = demo.timing.slow_call
    await demo.chaos("orders", delay_seconds=slow)
    await demo.chaos("inventory", delay_seconds=slow)
    demo.step(f"orders and inventory now take {slow}s per call")
    ids = await demo.start("crash", 5)
    deadline = time.monotonic() + 20
    while True:
        sagas = await asyncio.gather(*(demo.client.get_saga(i) for i in ids))
        # Charged, and waiting for a slow call to orders or inventory.
        midway = [
            s for s in sagas if current_step(s) in ("create_order", "reserve_stock", "send_receipt")
        ]
        if len(midway) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    at = Counter(current_step(s) for s in sagas if s["status"] not in TERMINAL)
    where = ", ".join(f"{n} at {step}" for step, n in sorted(at.items()))
    replays_before = await demo.replays()
    pid = demo.orchestrator.pid
    demo.orchestrator.kill()
    demo.step(f"SIGKILL to the orchestrator (pid {pid}) with sagas in flight: {where}")
    demo.expect(len(midway) >= 2, "fewer than 2 sagas were mid-way when it was killed")
    demo.orchestrator.start()
    await demo.orchestrator.wait_ready()
    demo.step(f"orchestrator restarted (pid {demo.orchestrator.pid})")
    sagas = await demo.finish(ids)
    statuses = [s["status"] for s in sagas]
    repeated = await demo.replays() - replays_before
    demo.step(
        f"the new process took the sagas over once the dead one's {LEASE_SECONDS}s leases"
        f" expired: {tally(statuses)}"
    )
    demo.expect(statuses == ["completed"] * 5, f"expected 5 completed, got {statuses}")
    await demo.exactly_once(ids)
    if repeated:
        demo.step(
            f"{repeated} call{'s' if repeated > 1 else ''} reached a participant a second time;"
            " the Idempotency-Key dedupe answered without a second effect"
        )
    demo.step("every order: charged, created, reserved and emailed exactly once")
    return f"killed mid-run and restarted -> {len(ids)} sagas completed, effects exactly once"


SCENARIOS: list[tuple[str, str, Callable[[Demo], Awaitable[str]]]] = [
    ("a", "Happy path: three checkouts", happy_path),
    ("b", "Payment succeeded, order creation failed -> refund the payment", order_fails),
    ("c", "Notifications down: the order still completes", notifications_down),
    ("d", "Inventory slow and failing, then recovering: its circuit breaker", inventory_flaky),
    ("e", "The orchestrator is killed (SIGKILL) mid-run and restarted", orchestrator_killed),
]


def _try_it(base_url: str, token: str, urls: dict[str, str]) -> None:
    body = (
        '{"definition": "checkout", "input": {"amount": 42, '
        '"items": [{"sku": "tea", "qty": 1}], "email": "you@example.com"}}'
    )
    say("\nEverything keeps running. Try it yourself:")
    say(f"  curl -s -X POST {base_url}/v1/sagas -H 'Authorization: Bearer {token}' \\")
    say("       -H 'Content-Type: application/json' -H 'Idempotency-Key: my-order-1' \\")
    say(f"       -d '{body}'")
    chaos = f"curl -s -X POST {urls['orders']}/_chaos -H 'Content-Type: application/json'"
    say(f"  {chaos} -d '{{\"fail_status\": 400}}'   # orders fails")
    say(f"  {chaos} -d '{{}}'                      # healed")
    say("Press Ctrl-C to stop.")


def _report(results: list[Result], base_url: str, token: str) -> None:
    say("\n" + "=" * 78)
    say("Report")
    for r in results:
        links = [f"{base_url}/admin/sagas/{saga_id}" for saga_id in r.saga_ids]
        verdict = "PASS" if r.passed else "FAIL"
        text = r.summary if r.passed else "; ".join(r.problems)
        say(f"  {verdict}  ({r.key}) {text}")
        for link in links:
            say(f"              {link}")
    passed = sum(r.passed for r in results)
    say("")
    say(f"  Dashboard     {base_url}/admin  (log in with the admin token)")
    say(f"  Admin token   {token}")
    say(f"  API docs      {base_url}/docs")
    if passed == len(results):
        say(f"  All {len(results)} scenarios passed.")
    else:
        say(f"  {len(results) - passed} of {len(results)} scenarios FAILED.")
    say("=" * 78)
