"""Dashboard sessions: created at login, checked on every request, revoked at logout."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class SessionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, digest: str, actor: str, client: str | None, seconds: float) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    INSERT INTO admin_sessions (id, actor, client, expires_at)
                    VALUES (:id, :actor, :client, now() + make_interval(secs => :seconds))
                    """
                ),
                {"id": digest, "actor": actor, "client": client, "seconds": seconds},
            )
            # Old rows go as new ones come: the table holds live sessions only.
            await conn.execute(
                text("DELETE FROM admin_sessions WHERE expires_at < now() - interval '1 day'")
            )

    async def valid(self, digest: str) -> bool:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT 1 FROM admin_sessions WHERE id = :id "
                        "AND revoked_at IS NULL AND expires_at > now()"
                    ),
                    {"id": digest},
                )
            ).first()
        return row is not None

    async def revoke(self, digest: str) -> bool:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE admin_sessions SET revoked_at = now() "
                        "WHERE id = :id AND revoked_at IS NULL RETURNING id"
                    ),
                    {"id": digest},
                )
            ).first()
        return row is not None
