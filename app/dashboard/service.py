"""What the dashboard and `GET /v1/admin/dashboard` show, gathered from the stores."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from app.api.context import AppContext
from app.api.schemas import (
    DeadLetterOut,
    DefinitionOut,
    PlanOut,
    SagaOut,
    SagaSummaryOut,
    ServiceOut,
)
from app.core.commit import SagaState, StepState, Waiting
from app.core.states import DeadLetterStatus, SagaStatus, StepStatus, WaitReason
from app.dashboard.views import (
    chart_bars,
    compensations_if_failed,
    fill_buckets,
    timeline,
    why_waiting,
)
from app.usecases.errors import Problem

IN_FLIGHT = (SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value)


class Dashboard:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    async def overview(self) -> dict[str, Any]:
        shared = await self.ctx.ops.shared_figures()
        by_status: dict[str, int] = {s.value: 0 for s in SagaStatus}
        by_definition: dict[str, dict[str, int]] = {}
        for (definition, status), count in (await self.ctx.ops.sagas_by_status()).items():
            by_status[status] = by_status.get(status, 0) + count
            by_definition.setdefault(definition, {})[status] = count
        buckets = fill_buckets(
            await self.ctx.ops.throughput(60, 5),
            await self.ctx.ops.db_now(),
        )
        finished = sum(b["finished"] for b in buckets)
        failed = sum(b["failed"] for b in buckets)
        services = await self.ctx.catalog.services(500, None)
        failures = await self.ctx.ops.recent_failures(10)
        return {
            "sagas_by_status": by_status,
            "sagas_by_definition": by_definition,
            "in_flight": sum(by_status.get(s, 0) for s in IN_FLIGHT),
            "last_hour": {
                "finished": finished,
                "failed": failed,
                "failure_rate": (failed / finished) if finished else 0.0,
                "buckets": [
                    {"at": b["at"].isoformat(), "finished": b["finished"], "failed": b["failed"]}
                    for b in buckets
                ],
            },
            "dead_letters_open": shared.dead_letters_open,
            "executor_lag_seconds": shared.executor_lag_seconds,
            "services": [
                {
                    "name": s.name,
                    "circuit_state": s.circuit_state.value,
                    "in_flight": s.in_flight,
                    "consecutive_failures": s.consecutive_failures,
                    "max_concurrency": s.spec.max_concurrency,
                }
                for s in services
            ],
            "recent_failures": [
                {
                    "id": str(f["id"]),
                    "definition": f["definition_name"],
                    "status": f["status"],
                    "error": f["error"],
                    "finished_at": f["finished_at"].isoformat() if f["finished_at"] else None,
                }
                for f in failures
            ],
        }

    def chart(self, overview: dict[str, Any]) -> dict[str, Any]:
        buckets = [
            {**b, "at": datetime.fromisoformat(b["at"])} for b in overview["last_hour"]["buckets"]
        ]
        return chart_bars(buckets)

    async def saga_detail(self, saga_id: uuid.UUID) -> dict[str, Any] | None:
        view = await self.ctx.sagas.find(str(saga_id))
        if view is None:
            return None
        events = await self.ctx.sagas.events(saga_id, 2000, None)
        schedule = await self.ctx.sagas.schedule(saga_id)
        now = schedule.get("db_now") or view.updated_at
        definition = await self.ctx.catalog.find_definition(
            view.definition, view.definition_version
        )
        last_error = next((s.last_error for s in view.steps if s.last_error), None)
        callback = next(
            (
                (s.name, s.callback_due_at)
                for s in view.steps
                if s.status is StepStatus.WAITING and s.callback_due_at is not None
            ),
            None,
        )
        bars = timeline(events, view.created_at, now)
        span = max([b.end for b in bars] + [0.001])
        return {
            "saga": SagaOut.of(view),
            "events": events,
            "bars": bars,
            "span": span,
            "waiting": why_waiting(
                view.status,
                schedule.get("due_at"),
                (
                    Waiting(WaitReason(schedule["waiting_reason"]), schedule["waiting_service"])
                    if schedule.get("waiting_reason")
                    else None
                ),
                schedule.get("lease_owner"),
                schedule.get("lease_expires_at"),
                now,
                last_error,
                callback,
            ),
            "would_compensate": compensations_if_failed(
                definition.spec,
                SagaState(
                    view.status,
                    tuple(
                        StepState(
                            s.name, s.status, maybe_applied=s.maybe_applied, in_flight=s.in_flight
                        )
                        for s in view.steps
                    ),
                ),
            )
            if definition
            else [],
        }

    async def sagas(
        self,
        status: SagaStatus | None,
        definition: str | None,
        query: str | None,
        business_key: str | None = None,
        labels: list[str] | None = None,
    ) -> list[SagaOut | SagaSummaryOut]:
        """The search box (an id or an idempotency key), else a filtered page: status,
        definition, business key and `key:value` labels, all of which must match."""
        if query:
            view = await self.ctx.sagas.find(query)
            return [SagaOut.of(view)] if view else []
        views = await self.ctx.sagas.page(100, status, definition, None, business_key, labels)
        return [SagaSummaryOut.of(v) for v in views]

    async def dead_letters(self, status: DeadLetterStatus | None) -> list[DeadLetterOut]:
        return [DeadLetterOut.of(v) for v in await self.ctx.ops.dead_letters(200, status)]

    async def services(self) -> list[ServiceOut]:
        return [ServiceOut.of(s) for s in await self.ctx.catalog.services(500, None)]

    async def definitions(self) -> list[DefinitionOut]:
        return [DefinitionOut.of(d) for d in await self.ctx.catalog.definitions(500, None)]

    async def plan(self, name: str, version: int | None) -> dict[str, Any] | None:
        """A definition's failure plan and checklist, as `GET …/plan` answers them."""
        try:
            record, review = await self.ctx.catalog.plan(name, version)
        except Problem:
            return None
        return {
            "definition": DefinitionOut.of(record),
            "plan": PlanOut.of(record.name, record.version, review),
        }

    async def audit(self) -> list[dict[str, Any]]:
        return await self.ctx.ops.audit_log(200)
