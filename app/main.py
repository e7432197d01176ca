"""create_app: the one place that wires settings, storage, API and executor together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from app.api import admin_routes, health, problems, registry_routes, saga_routes
from app.api.auth import Tokens
from app.api.context import AppContext
from app.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, V1GuardMiddleware
from app.dashboard import routes as dashboard_routes
from app.dashboard.auth import LoginLimiter
from app.engine.executor import Executor
from app.logs import known_secrets
from app.participants.client import ParticipantClient
from app.settings import Settings
from app.store.admin import AdminStore
from app.store.db import make_engine
from app.store.listen import Listener, SagaWaiters
from app.store.registry import Registry
from app.store.sagas import SAGA_DONE_CHANNEL, SagaStore
from app.store.sessions import SessionStore
from app.store.stats import StatsStore
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing

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
        waiters = SagaWaiters()
        app.state.ctx = AppContext(
            settings=settings,
            engine=engine,
            registry=Registry(engine),
            sagas=SagaStore(engine),
            waiters=waiters,
            admin=AdminStore(engine),
            stats=StatsStore(engine),
            metrics=metrics,
            tokens=tokens,
            sessions=SessionStore(engine),
            login_limiter=LoginLimiter(),
        )
        listener = Listener(
            database_url, [SAGA_DONE_CHANNEL], lambda _c, payload: waiters.notify(payload)
        )
        background = [asyncio.create_task(listener.run(), name="api-listen")]
        stop = asyncio.Event()
        executor_task = None
        if run_executor:
            executor = Executor(
                engine,
                settings,
                database_url,
                client=participant_client,
                metrics=metrics,
                tracing=tracing,
            )
            executor_task = asyncio.create_task(executor.run(stop), name="executor")
        try:
            yield
        finally:
            stop.set()
            if executor_task is not None:
                await executor_task
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await engine.dispose()
            tracing.shutdown()

    app = FastAPI(
        title="Saga orchestrator",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    problems.install(app)
    app.add_middleware(V1GuardMiddleware, tokens=tokens)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health.router)
    app.include_router(registry_routes.router)
    app.include_router(saga_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(dashboard_routes.api)
    app.include_router(dashboard_routes.pages)

    @app.exception_handler(dashboard_routes.LoginRequired)
    async def _to_login(request: Request, _exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/admin/login?{urlencode({'next': target})}", status_code=303)

    return app
