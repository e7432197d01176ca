"""create_app: the one place that wires settings, storage, API and executor together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlencode

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from opentelemetry import trace
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api import (
    admin_routes,
    callback_routes,
    health,
    openapi,
    problems,
    registry_routes,
    saga_routes,
)
from app.api.auth import Tokens
from app.api.context import AppContext
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, V1GuardMiddleware
from app.core.commit import SagaState, StepState
from app.core.definition import DefinitionSpec
from app.core.states import SagaStatus, StepStatus, WaitReason
from app.core.views import Handoff, NewSaga, SagaDocument
from app.dashboard import routes as dashboard_routes
from app.dashboard.auth import LoginLimiter
from app.engine.ports import Caller, Claimed, Lease
from app.engine.runner import EngineConfig, Executor, new_worker_id
from app.logs import known_secrets
from app.participants.client import ParticipantClient
from app.settings import Settings
from app.store.admin import AdminStore
from app.store.callbacks import CallbackStore
from app.store.db import make_engine
from app.store.documents import SagaDocuments
from app.store.listen import Listener, SagaWaiters
from app.store.pool import open_pool
from app.store.registry import Registry
from app.store.repository import PgSagaRepository
from app.store.sagas import SAGA_DONE_CHANNEL, SAGA_WORK_CHANNEL, SagaStore
from app.store.sessions import SessionStore
from app.store.stats import StatsStore
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing
from app.usecases.callbacks import Callbacks
from app.usecases.catalog import Catalog
from app.usecases.operations import Operations
from app.usecases.sagas import Sagas

log = logging.getLogger(__name__)

DESCRIPTION = """Saga orchestration on PostgreSQL: register participant services and saga
definitions, start sagas idempotently, and follow them to `completed`, `compensated`
or `failed`. Every error is RFC 9457 problem+json."""


def resolve_tokens(settings: Settings) -> Tokens:
    admin = settings.admin_token
    if not admin:
        admin = secrets.token_urlsafe(24)
        log.warning(
            "SAGA_ADMIN_TOKEN is not set; generated one for this process",
            extra={"admin_token": admin},
        )
    known_secrets.add(settings.api_token, admin, settings.metrics_token)
    return Tokens(api=settings.api_token or None, admin=admin)


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    PoolTimeout,
    DBAPIError,
    psycopg.OperationalError,  # the hot paths' plain pool (its PoolTimeout is one too)
    psycopg.InterfaceError,
)


def database_trouble(error: BaseException) -> problems.DatabaseTrouble | None:
    """How the API answers a database error: unreachable or lost (503), or failed (500)."""
    if isinstance(error, OperationalError | PoolTimeout | InterfaceError):
        return problems.DatabaseTrouble.UNAVAILABLE
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        # A connection the server ended (restart, terminate) or one that cannot be made.
        return problems.DatabaseTrouble.UNAVAILABLE
    if isinstance(error, DBAPIError):
        lost = error.connection_invalidated
        return problems.DatabaseTrouble.LOST if lost else problems.DatabaseTrouble.FAILED
    return None


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        lease_seconds=settings.lease_seconds,
        concurrency=settings.worker_concurrency,
        poll_interval_seconds=settings.poll_interval_seconds,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        failpoint=settings.failpoint,
        retention_seconds=settings.retention_seconds,
        callback_url=f"{settings.callback_base}/v1/callbacks/",
    )


def build_executor(
    settings: Settings,
    engine: AsyncEngine,
    *,
    worker_id: str | None = None,
    caller: Caller | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    on_denied: Callable[[Lease, WaitReason], None] | None = None,
    on_finished: Callable[[uuid.UUID], None] | None = None,
) -> Executor:
    """An executor on PostgreSQL, calling participants over HTTP through the host policy."""
    worker_id = worker_id or new_worker_id()
    repo = PgSagaRepository(engine, worker_id, settings.lease_seconds)
    return Executor(
        repo,
        caller or ParticipantClient(settings.host_policy),
        engine_config(settings),
        worker_id,
        metrics=metrics,
        tracing=tracing,
        on_denied=on_denied,
        on_finished=on_finished,
        notifications=repo,
    )


class LocalHandoff:
    """`serve`: the API hands each new saga to the executor of its own process, leased
    to it in the very statement that creates the saga (with its first attempt started
    there too, when it can be), so no claim and no notification stand between a start
    and its first call."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def handoff(self, spec: DefinitionSpec) -> Handoff | None:
        if not self.executor.has_room():
            return None  # it is claimed by whichever executor has room, as usual
        first = self.executor.driver.first_attempt(spec)
        return Handoff(self.executor.worker_id, self.executor.config.lease_seconds, first)

    def adopt(self, new: NewSaga, document: SagaDocument, handoff: Handoff) -> None:
        spec = new.definition.spec
        assert document.db_now is not None
        state = SagaState(
            SagaStatus.RUNNING,
            tuple(StepState(s.name, StepStatus.PENDING) for s in spec.steps),
            deadline_at=document.deadline_at,
        )
        claimed = Claimed(
            lease=Lease(document.id, 1),
            definition_id=new.definition.id,
            definition_name=new.definition.name,
            input=new.input,
            request_id=new.request_id,
            traceparent=document.traceparent,
            deadline_at=document.deadline_at,
            state=state,
            db_now=document.db_now,
        )
        first = handoff.first if document.first_attempt else None
        self.executor.adopt(claimed, spec, first.prepared if first is not None else None)

    def holds(self, saga_id: uuid.UUID) -> bool:
        return self.executor.holds(saga_id)


async def run_executor_until(
    executor: Executor, database_url: str, stop: asyncio.Event, own_caller: bool = True
) -> None:
    """Run `executor` until `stop`, woken by the database's notifications of new work."""
    listener = Listener(
        database_url, [SAGA_WORK_CHANNEL], lambda _c, payload: executor.wake(payload)
    )
    listening = asyncio.create_task(listener.run(), name="executor-listen")
    try:
        await executor.run(stop)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
        if own_caller:
            await executor.caller.aclose()


def create_app(
    settings: Settings,
    database_url: str,
    run_executor: bool = False,
    participant_client: ParticipantClient | None = None,
) -> FastAPI:
    """The ASGI app; with `run_executor` it also drives sagas in this process (calling
    participants through `participant_client`, by default one built from settings)."""
    tokens = resolve_tokens(settings)
    metrics = Metrics()
    tracing = Tracing(settings.otlp_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(database_url, settings.db_pool_size, settings.lease_seconds)
        pool = await open_pool(database_url, settings.db_pool_size, settings.lease_seconds)
        waiters = SagaWaiters()
        registry = Registry(engine)
        admin = AdminStore(engine)
        stop = asyncio.Event()
        executor = None
        if run_executor:
            executor = build_executor(
                settings,
                engine,
                caller=participant_client,
                metrics=metrics,
                tracing=tracing,
                on_finished=lambda saga_id: waiters.notify(str(saga_id)),
            )
        app.state.ctx = AppContext(
            settings=settings,
            sagas=Sagas(
                SagaStore(engine),
                SagaDocuments(pool),
                registry,
                admin,
                waiters,
                settings.idempotency_ttl_hours * 3600,
                local=LocalHandoff(executor) if executor is not None else None,
                hosts=settings.host_policy,
            ),
            callbacks=Callbacks(CallbackStore(engine)),
            catalog=Catalog(registry, settings.host_policy),
            ops=Operations(admin, StatsStore(engine), registry, SessionStore(engine)),
            metrics=metrics,
            tokens=tokens,
            login_limiter=LoginLimiter(),
        )
        listener = Listener(
            database_url, [SAGA_DONE_CHANNEL], lambda _c, payload: waiters.notify(payload)
        )
        background = [asyncio.create_task(listener.run(), name="api-listen")]
        executor_task = None
        if executor is not None:
            executor_task = asyncio.create_task(
                run_executor_until(
                    executor, database_url, stop, own_caller=participant_client is None
                ),
                name="executor",
            )
        try:
            yield
        finally:
            stop.set()
            if executor_task is not None:
                await executor_task
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await pool.close()
            await engine.dispose()
            tracing.shutdown()

    app = FastAPI(
        # FastAPI's own OpenTelemetry asks the environment for global providers on every
        # request: on only when a tracer provider is set at start (auto-instrumentation
        # sets it first). The service's spans and metrics are its own (`telemetry`).
        telemetry={
            "tracing": not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider),
            "metrics": False,
            "logs": False,
        },
        title="Saga orchestrator",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=openapi.TAGS,
        generate_unique_id_function=openapi.operation_id,
    )
    problems.install(app, DATABASE_ERRORS, database_trouble)
    app.add_middleware(V1GuardMiddleware, tokens=tokens)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router, tags=["operations"])
    app.include_router(registry_routes.router)  # tagged per route: services, definitions
    app.include_router(saga_routes.router, tags=["sagas"])
    app.include_router(callback_routes.router, tags=["callbacks"])
    app.include_router(admin_routes.router, tags=["admin"])
    app.include_router(dashboard_routes.api, tags=["admin"])
    app.include_router(dashboard_routes.pages)

    @app.exception_handler(dashboard_routes.LoginRequired)
    async def _to_login(request: Request, _exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/admin/login?{urlencode({'next': target})}", status_code=303)

    return app
