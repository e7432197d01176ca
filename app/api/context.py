"""What every route needs, wired once in create_app and reached through one dependency:
the use cases (routes never reach a store), the settings, metrics and tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import Tokens
from app.dashboard.auth import LoginLimiter
from app.settings import Settings
from app.telemetry.metrics import Metrics
from app.usecases.callbacks import Callbacks
from app.usecases.catalog import Catalog
from app.usecases.operations import Operations
from app.usecases.sagas import Sagas


@dataclass
class AppContext:
    settings: Settings
    sagas: Sagas
    callbacks: Callbacks
    catalog: Catalog
    ops: Operations
    metrics: Metrics
    tokens: Tokens
    login_limiter: LoginLimiter


async def get_ctx(request: Request) -> AppContext:
    # async: a plain `def` dependency would run in a worker thread on every request.
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]
