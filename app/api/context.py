"""What every route needs, wired once in create_app and reached through one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api.auth import Tokens
from app.dashboard.auth import LoginLimiter
from app.settings import Settings
from app.store.admin import AdminStore
from app.store.listen import SagaWaiters
from app.store.registry import Registry
from app.store.sagas import SagaStore
from app.store.sessions import SessionStore
from app.store.stats import StatsStore
from app.telemetry.metrics import Metrics


@dataclass
class AppContext:
    settings: Settings
    engine: AsyncEngine
    registry: Registry
    sagas: SagaStore
    waiters: SagaWaiters
    admin: AdminStore
    stats: StatsStore
    metrics: Metrics
    tokens: Tokens
    sessions: SessionStore
    login_limiter: LoginLimiter


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]
