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
      and every participant applied each effect exactly once;
  (f) the payment provider, which confirms charges asynchronously (charge_payment is a
      callback step: payments answers 202, then reports), declines the card: the
      failed report compensates the saga.

In (a) a charge is seen waiting for its callback, and its history shows the 202, the
report taken, and the step's success.

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
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI

from app import logs
from app.client import ApiError, SagaClient
from app.settings import Settings, libpq_url
from app.store.db import Database
from app.store.migrate import upgrade
from examples.demo.scenarios import (
    DEFINITION,
    LEASE_SECONDS,
    PARTICIPANTS,
    SCENARIOS,
    Demo,
    Result,
)
from examples.launcher import Launcher, Proc

log = logging.getLogger(__name__)


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long things take; `--fast` shrinks them for the tests."""

    slow_call: float  # participant delay while the orchestrator gets killed (e)
    confirm_delay: float  # the payment provider's confirmation, so (a) shows it waiting
    inventory_delay: float  # inventory's slowness while it fails (d)
    recovery_timeout: float  # inventory's circuit breaker (d)
    pause: float  # between scenarios, so that a person can follow along


FAST = Timing(
    slow_call=0.5, confirm_delay=0.5, inventory_delay=0.2, recovery_timeout=1.5, pause=0.0
)
NORMAL = Timing(
    slow_call=0.8, confirm_delay=1.5, inventory_delay=0.3, recovery_timeout=3.0, pause=0.8
)


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

    orchestrator = Orchestrator(port, database.url, token, log_path.parent)
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
    """`python -m app serve` as a child process (the shared launcher's), against the
    demo's database; restarted after the SIGKILL of scenario (e)."""

    def __init__(self, port: int, database_url: str, admin_token: str, log_dir: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.launcher = Launcher(
            database_url,
            log_dir,
            {
                "SAGA_ADMIN_TOKEN": admin_token,
                "SAGA_LEASE_SECONDS": LEASE_SECONDS,
                "SAGA_POLL_INTERVAL": 0.25,
                "SAGA_SHUTDOWN_GRACE": 3,
                "SAGA_ALLOWED_HOSTS": "127.0.0.1",  # the participants live here, nowhere else
                "SAGA_LOG_FORMAT": os.environ.get("SAGA_LOG_FORMAT", "console"),
            },
        )
        self.proc: Proc | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    @property
    def returncode(self) -> int | None:
        return self.proc.popen.poll() if self.proc else None

    @property
    def log_path(self) -> Path:
        return self.launcher.workdir / "demo-orchestrator.log"

    def start(self) -> None:
        self.proc = self.launcher.start("serve", "demo-orchestrator", port=self.port)

    async def wait_ready(self, within: float = 90.0) -> None:
        assert self.proc is not None
        try:
            await self.launcher.ready(self.proc, within)
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(f"the orchestrator did not start; see {self.log_path}") from exc

    def kill(self) -> None:
        if self.proc is not None and self.proc.alive:
            self.proc.kill()
            self.proc.popen.wait()

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()


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
