"""Aggregate figures for /metrics and the dashboard, each one indexed query."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.telemetry.metrics import SharedFigures


class StatsStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def shared_figures(self) -> SharedFigures:
        """What /metrics shows of the shared state, from cheap indexed reads only: sagas
        in flight (a partial index), circuits, calls in flight, open dead letters and the
        executor's lag; never an aggregate over all finished sagas (those are counted by
        each executor's `saga_finished` counter)."""
        async with self.engine.connect() as conn:
            active = (
                await conn.execute(
                    text(
                        "SELECT definition_name, status, count(*) AS n FROM sagas "
                        "WHERE status IN ('running', 'compensating') "
                        "GROUP BY definition_name, status"
                    )
                )
            ).all()
            circuits = (
                await conn.execute(text("SELECT service, state FROM circuit_breakers"))
            ).all()
            in_flight = (
                await conn.execute(
                    text(
                        "SELECT service, count(*) AS n FROM service_slots "
                        "WHERE kind = 'call' AND held_until > now() GROUP BY service"
                    )
                )
            ).all()
            dead = (
                await conn.execute(text("SELECT count(*) FROM dead_letters WHERE status = 'open'"))
            ).scalar_one()
            lag = (
                await conn.execute(
                    text(
                        "SELECT coalesce(EXTRACT(EPOCH FROM now() - min(due_at)), 0) "
                        "FROM sagas WHERE due_at <= now()"
                    )
                )
            ).scalar_one()
        return SharedFigures(
            sagas_by_status={(r.definition_name, r.status): int(r.n) for r in active},
            circuits={r.service: r.state for r in circuits},
            in_flight={r.service: int(r.n) for r in in_flight},
            dead_letters_open=int(dead),
            executor_lag_seconds=max(0.0, float(lag)),
        )

    async def sagas_by_status(self) -> dict[tuple[str, str], int]:
        """Every saga by definition and status, finished ones included: the dashboard's
        overview (an admin page, not scraped; bounded by retention)."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT definition_name, status, count(*) AS n FROM sagas "
                        "GROUP BY definition_name, status"
                    )
                )
            ).all()
        return {(r.definition_name, r.status): int(r.n) for r in rows}

    async def throughput(self, minutes: int = 60, bucket_minutes: int = 5) -> list[dict[str, Any]]:
        """Sagas finished per time bucket over the last `minutes`, with failures."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        """
                        SELECT to_timestamp(floor(EXTRACT(EPOCH FROM finished_at)
                                 / (:b * 60)) * (:b * 60)) AS bucket,
                               count(*) AS finished,
                               count(*) FILTER (WHERE status <> 'completed') AS failed
                          FROM sagas
                         WHERE finished_at > now() - make_interval(mins => :m)
                         GROUP BY 1 ORDER BY 1
                        """
                    ),
                    {"m": minutes, "b": bucket_minutes},
                )
            ).all()
        return [
            {"at": r.bucket, "finished": int(r.finished), "failed": int(r.failed)} for r in rows
        ]

    async def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        """
                        SELECT id, definition_name, status, error, finished_at
                          FROM sagas
                         WHERE status IN ('compensated', 'failed')
                         ORDER BY finished_at DESC NULLS LAST LIMIT :n
                        """
                    ),
                    {"n": limit},
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    async def db_now(self) -> datetime:
        async with self.engine.connect() as conn:
            value: datetime = (await conn.execute(text("SELECT now()"))).scalar_one()
        return value

    async def schema_revision(self) -> str | None:
        """The migration the database is at (raises when it cannot be reached)."""
        async with self.engine.connect() as conn:
            value: str | None = (
                await conn.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one_or_none()
        return value
