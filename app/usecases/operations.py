"""What operators do and see: dead letters, breakers, the audit log, the service's own
health and figures, dashboard sessions."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Any

from app.core.states import DeadLetterStatus
from app.core.views import ActionResult, DeadLetterView, ServiceRecord
from app.store.admin import AdminStore
from app.store.migrate import head_revision
from app.store.registry import Registry
from app.store.sessions import SessionStore
from app.store.stats import StatsStore
from app.telemetry.metrics import SharedFigures
from app.usecases.errors import Problem


class Done(Enum):
    DONE = "done"  # the action was taken now
    ALREADY = "already"  # it had been taken before: idempotent success


class Operations:
    def __init__(
        self,
        admin: AdminStore,
        stats: StatsStore,
        registry: Registry,
        sessions: SessionStore,
    ) -> None:
        self.admin = admin
        self.stats = stats
        self.registry = registry
        self.sessions = sessions

    async def dead_letters(
        self,
        limit: int,
        status: DeadLetterStatus | None = None,
        definition: str | None = None,
        service: str | None = None,
        before: tuple[datetime, uuid.UUID] | None = None,
    ) -> list[DeadLetterView]:
        return await self.admin.dead_letters(limit, status, definition, service, before)

    async def dead_letter(self, dl_id: uuid.UUID) -> DeadLetterView:
        view = await self.admin.dead_letter(dl_id)
        if view is None:
            raise Problem(404, f"no dead letter with id {dl_id}", slug="unknown-dead-letter")
        return view

    async def retry_dead_letter(self, dl_id: uuid.UUID, actor: str) -> Done:
        return _done(*await self.admin.retry_dead_letter(dl_id, actor))

    async def discard_dead_letter(self, dl_id: uuid.UUID, actor: str, reason: str) -> Done:
        return _done(*await self.admin.discard_dead_letter(dl_id, actor, reason))

    async def reset_circuit(self, name: str, actor: str) -> ServiceRecord:
        if not await self.admin.reset_circuit(name, actor):
            raise Problem(404, f"no service named '{name}'", slug="unknown-service")
        record = await self.registry.get_service(name)
        if record is None:
            raise Problem(404, f"no service named '{name}'", slug="unknown-service")
        return record

    async def audit_log(self, limit: int, before_id: int | None = None) -> list[dict[str, Any]]:
        return await self.admin.audit_log(limit, before_id)

    async def readiness(self) -> tuple[str | None, str | None]:
        """(the database's migration revision, the code's latest); raises when the
        database cannot be reached."""
        return await self.stats.schema_revision(), head_revision()

    async def shared_figures(self) -> SharedFigures:
        return await self.stats.shared_figures()

    # --- the dashboard's figures ------------------------------------------------------

    async def sagas_by_status(self) -> dict[tuple[str, str], int]:
        return await self.stats.sagas_by_status()

    async def throughput(self, minutes: int, bucket_minutes: int) -> list[dict[str, Any]]:
        return await self.stats.throughput(minutes=minutes, bucket_minutes=bucket_minutes)

    async def recent_failures(self, limit: int) -> list[dict[str, Any]]:
        return await self.stats.recent_failures(limit)

    async def db_now(self) -> datetime:
        return await self.stats.db_now()

    # --- dashboard sessions -----------------------------------------------------------

    async def open_session(
        self, digest: str, actor: str, client: str | None, seconds: float
    ) -> None:
        await self.sessions.create(digest, actor, client, seconds)

    async def session_valid(self, digest: str) -> bool:
        return await self.sessions.valid(digest)

    async def close_session(self, digest: str) -> None:
        await self.sessions.revoke(digest)


def _done(result: ActionResult, message: str) -> Done:
    if result is ActionResult.NOT_FOUND:
        raise Problem(404, message, slug="unknown-dead-letter")
    if result is ActionResult.CONFLICT:
        raise Problem(409, message, slug="dead-letter-conflict")
    return Done.ALREADY if result is ActionResult.ALREADY else Done.DONE
