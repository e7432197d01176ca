"""The `saga-orchestrator` command: serve, api, worker, migrate, demo, plan."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from app import cli_plan, logs
from app.settings import Settings, exposure
from app.store.db import Database, make_engine, open_database
from app.store.migrate import upgrade

log = logging.getLogger("app.cli")

HELP = {
    "serve": "Apply pending migrations, then run the HTTP API and the step executor in one "
    "process. The usual way to run a single node.",
    "api": "Run only the HTTP API (no sagas are executed by this process). Scale it apart "
    "from the workers; any number may share one database.",
    "worker": "Run only the step executor: claim due sagas and call participants. Any number "
    "of workers may share one database; SIGTERM stops claiming and lets in-flight calls "
    "finish within SAGA_SHUTDOWN_GRACE seconds.",
    "migrate": "Apply pending database migrations and exit.",
    "prune": "Run one retention pass: delete the sagas that finished more than "
    "SAGA_RETENTION_HOURS ago (with their steps, events, idempotency keys and resolved dead "
    "letters; a saga with an open dead letter is kept), and print the rows deleted per table. "
    "Workers do this on their own every minute; one pass at a time runs across processes.",
    "demo": "Run the checkout demo: start the database, four example participants and the "
    "orchestrator, break things on purpose (a failing order, a service down, a flaky service, "
    "the orchestrator killed) and report how every saga ended. Keeps serving until Ctrl-C.",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saga-orchestrator",
        description="Saga orchestration on PostgreSQL. Configuration comes from the "
        "environment (DATABASE_URL, SAGA_*); with no DATABASE_URL an embedded PostgreSQL "
        "is started in SAGA_DATA_DIR.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("serve", "api"):
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
        p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    for name in ("worker", "migrate"):
        sub.add_parser(name, help=HELP[name], description=HELP[name])
    prune = sub.add_parser("prune", help=HELP["prune"], description=HELP["prune"])
    prune.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted; delete nothing"
    )
    demo = sub.add_parser("demo", help=HELP["demo"], description=HELP["demo"])
    demo.add_argument(
        "--port", type=int, default=8000, help="the orchestrator's port (default 8000)"
    )
    demo.add_argument("--fast", action="store_true", help="shorter delays (for tests)")
    demo.add_argument(
        "--exit",
        action="store_true",
        help="exit after the report (status 0 when every scenario passed, else 1)",
    )
    plan = sub.add_parser("plan", help=cli_plan.HELP, description=cli_plan.HELP)
    plan.add_argument("file", metavar="FILE.json", help="a definition document")
    plan.add_argument(
        "--services",
        metavar="FILE.json",
        help="service documents by name (or a GET /v1/services answer); without it every "
        "service is unknown: default timeouts and breakers, and `isolation` says so",
    )
    plan.add_argument("--strict", action="store_true", help="exit 1 when a rule is not ok")
    plan.add_argument("--json", action="store_true", help="print the plan as the API answers it")
    return parser


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    """Every command stops cleanly on SIGINT (Ctrl-C) and SIGTERM: what it started is
    stopped, the embedded PostgreSQL included, and it exits 0 without a traceback."""
    args = _parser().parse_args(argv)
    if args.command == "plan":  # no database, no settings: a file in, a plan out
        sys.exit(cli_plan.plan_command(args.file, args.services, args.strict, args.json))
    settings = Settings()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _exit_cleanly)
    if args.command == "demo":
        from examples.demo import run_demo

        sys.exit(run_demo(settings, args.port, fast=args.fast, exit_after=args.exit))
    logs.configure(settings.log_format, settings.log_level)
    if args.command in ("serve", "api"):
        refusals, warnings = exposure(settings, args.host)
        for warning in warnings:
            log.warning(warning)
        for refusal in refusals:
            log.error(refusal)
        if refusals:
            sys.exit(2)
    database = start_database(settings)
    try:
        if args.command == "migrate":
            upgrade(database.url)
            log.info("migrations applied")
        elif args.command in ("serve", "api"):
            if args.command == "serve" or database.embedded is not None:
                upgrade(database.url)
            _serve(settings, database, args.host, args.port, args.command == "serve")
        elif args.command == "worker":
            asyncio.run(run_worker(settings, database.url))
        elif args.command == "prune":
            sys.exit(asyncio.run(run_prune(settings, database.url, args.dry_run)))
    finally:
        stop_database(database)


def start_database(settings: Settings) -> Database:
    """Open the database with SIGINT and SIGTERM held back: a signal during the embedded
    server's start is delivered once `Database` exists, so its `finally` stops the server
    instead of leaving a postgres behind."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return open_database(settings)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def stop_database(database: Database) -> None:
    """Stop the embedded server; a second Ctrl-C must not cut this short."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    database.close()


def _serve(settings: Settings, database: Database, host: str, port: int, executor: bool) -> None:
    import uvicorn

    from app.main import create_app

    if settings.public_url is None and executor:
        # Callback steps' participants report to this process unless told otherwise.
        local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        settings = settings.model_copy(update={"public_url": f"http://{local}:{port}"})
    app = create_app(settings, database.url, run_executor=executor)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the
    # handler that was installed before it (`_exit_cleanly`, from main): an orderly
    # exit, so that the embedded database is stopped and the exit status is 0.
    log.info("listening", extra={"url": f"http://{host}:{port}", "executor": executor})
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
    )


def _exit_cleanly(signum: int, _frame: object) -> None:
    """The first stop signal unwinds the command through its `finally` blocks."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(0)


async def run_worker(settings: Settings, url: str) -> None:
    """Run the executor until SIGTERM or SIGINT, then drain gracefully."""
    from app.main import build_executor, run_executor_until

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine = make_engine(url, settings.db_pool_size, settings.lease_seconds)
    try:
        await run_executor_until(build_executor(settings, engine), url, stop)
    finally:
        await engine.dispose()


async def run_prune(settings: Settings, url: str, dry_run: bool) -> int:
    """One retention pass (or its dry run), reported on stdout; the exit status."""
    from app.store.retention import Retention

    seconds = settings.retention_seconds
    if seconds is None:
        print("retention is off (SAGA_RETENTION_HOURS=0): finished sagas are kept forever")
        return 0
    engine = make_engine(url, 2, settings.lease_seconds)
    try:
        retention = Retention(engine)
        pruned = await (retention.dry_run(seconds) if dry_run else retention.prune(seconds))
    finally:
        await engine.dispose()
    if pruned is None:
        print("another process is pruning now; nothing done")
        return 0
    hours = f"{settings.retention_hours:g}"
    print(f"{'would delete' if dry_run else 'deleted'} (sagas finished more than {hours} h ago):")
    for table, rows in pruned.counts().items():
        print(f"  {table}: {rows}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
