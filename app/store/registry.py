"""Services and definitions: registration and lookup."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.core.audit import service_changes
from app.core.definition import STORED, DefinitionSpec, ServiceSpec
from app.core.states import CircuitState, SlotKind
from app.core.views import DefinitionRecord, ServiceRecord
from app.logs import known_secrets
from app.store.tables import AdminAudit, CircuitBreaker, Definition, Service, ServiceSlot


def service_spec(row: Any) -> ServiceSpec:
    """A `services` row as the document it was registered with. Its header values are
    secrets: every process that reads them has them masked in its logs."""
    known_secrets.add(*row.headers.values())
    return ServiceSpec.model_validate(
        {
            "base_url": row.base_url,
            "timeout_seconds": row.timeout_seconds,
            "max_concurrency": row.max_concurrency,
            "circuit_breaker": {
                "failure_threshold": row.failure_threshold,
                "recovery_timeout_seconds": row.recovery_timeout_seconds,
                "half_open_max_calls": row.half_open_max_calls,
            },
            "headers": row.headers,
        },
        context=STORED,
    )


def _service_record(row: Any) -> ServiceRecord:
    spec = service_spec(row)
    return ServiceRecord(
        name=row.name,
        spec=spec,
        created_at=row.created_at,
        updated_at=row.updated_at,
        circuit_state=CircuitState(row.state or CircuitState.CLOSED),
        consecutive_failures=row.consecutive_failures or 0,
        opened_at=row.opened_at,
        in_flight=row.in_flight or 0,
        version=row.version,
    )


def _definition_record(row: Any) -> DefinitionRecord:
    return DefinitionRecord(
        id=row.id,
        name=row.name,
        version=row.version,
        content_hash=row.content_hash,
        spec=DefinitionSpec.model_validate(row.spec, context=STORED),
        created_at=row.created_at,
    )


# Calls in flight to a service: its bulkhead slots held under a live lease.
_IN_FLIGHT = (
    select(func.count())
    .select_from(ServiceSlot)
    .where(
        ServiceSlot.service == Service.name,
        ServiceSlot.kind == SlotKind.CALL,
        ServiceSlot.held_until > func.now(),
    )
    .correlate(Service)
    .scalar_subquery()
    .label("in_flight")
)

_SERVICE_COLUMNS = (
    Service,
    CircuitBreaker.state,
    CircuitBreaker.consecutive_failures,
    CircuitBreaker.opened_at,
    _IN_FLIGHT,
)


async def audit(
    conn: AsyncConnection, actor: str, action: str, target: str, details: dict[str, Any]
) -> None:
    """One audit row, in the caller's transaction: the action and its record commit together."""
    await conn.execute(
        insert(AdminAudit).values(actor=actor, action=action, target=target, details=details)
    )


_SYNC_SLOTS = text(
    """
    WITH wanted AS (
      SELECT 'call' AS kind, n FROM generate_series(1, :calls) AS n
      UNION ALL SELECT 'probe', n FROM generate_series(1, :probes) AS n
    ), added AS (
      INSERT INTO service_slots (service, kind, slot)
      SELECT :service, kind, n FROM wanted
      ON CONFLICT DO NOTHING
    )
    DELETE FROM service_slots
     WHERE service = :service
       AND ((kind = 'call' AND slot > :calls) OR (kind = 'probe' AND slot > :probes))
    """
)


async def sync_slots(conn: AsyncConnection, name: str, spec: ServiceSpec) -> None:
    """One bulkhead slot per `max_concurrency`, one probe slot per `half_open_max_calls`.
    A slot removed while held ends with its call: the bulkhead shrinks as calls finish."""
    await conn.execute(
        _SYNC_SLOTS,
        {
            "service": name,
            "calls": spec.max_concurrency,
            "probes": spec.circuit_breaker.half_open_max_calls,
        },
    )


class Registry:
    """Queries on services and definitions."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def put_service(
        self, name: str, spec: ServiceSpec, actor: str
    ) -> tuple[ServiceRecord, bool]:
        """Register or replace a service, recorded in the audit log in the same
        transaction (what changed, never a header value); True when it is new."""
        known_secrets.add(*spec.headers.values())
        values = {
            "name": name,
            "base_url": spec.base_url,
            "timeout_seconds": spec.timeout_seconds,
            "max_concurrency": spec.max_concurrency,
            "failure_threshold": spec.circuit_breaker.failure_threshold,
            "recovery_timeout_seconds": spec.circuit_breaker.recovery_timeout_seconds,
            "half_open_max_calls": spec.circuit_breaker.half_open_max_calls,
            "headers": spec.headers,
        }
        base = insert(Service).values(**values)
        stmt = base.on_conflict_do_update(
            index_elements=[Service.name],
            set_={
                **{k: base.excluded[k] for k in values if k != "name"},
                "updated_at": func.now(),
                "version": Service.version + 1,
            },
        ).returning(text("(xmax = 0) AS created"))
        async with self.engine.begin() as conn:
            previous = (
                await conn.execute(select(Service).where(Service.name == name).with_for_update())
            ).first()
            created = bool((await conn.execute(stmt)).scalar_one())
            await conn.execute(insert(CircuitBreaker).values(service=name).on_conflict_do_nothing())
            await sync_slots(conn, name, spec)
            old = service_spec(previous) if previous is not None else None
            await audit(conn, actor, "service.register", name, service_changes(old, spec))
        record = await self.get_service(name)
        assert record is not None
        return record, created

    async def get_service(self, name: str) -> ServiceRecord | None:
        stmt = (
            select(*_SERVICE_COLUMNS)
            .outerjoin(CircuitBreaker, CircuitBreaker.service == Service.name)
            .where(Service.name == name)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return _service_record(row) if row else None

    async def list_services(self, limit: int, after: str | None) -> list[ServiceRecord]:
        stmt = (
            select(*_SERVICE_COLUMNS)
            .outerjoin(CircuitBreaker, CircuitBreaker.service == Service.name)
            .order_by(Service.name)
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(Service.name > after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_service_record(r) for r in rows]

    async def service_names(self, names: set[str]) -> set[str]:
        if not names:
            return set()
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(Service.name).where(Service.name.in_(names)))
        return {r[0] for r in rows}

    async def register_definition(
        self, spec: DefinitionSpec, actor: str
    ) -> tuple[DefinitionRecord, bool]:
        """Store a new version unless the latest has the same content; True when created.
        Either way the registration is in the audit log, with the version it answered."""
        digest = spec.content_hash()
        async with self.engine.begin() as conn:
            # Serialise registrations of one name so versions stay dense and unique.
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext('definition:' || :name))"),
                {"name": spec.name},
            )
            latest = (
                await conn.execute(
                    select(Definition)
                    .where(Definition.name == spec.name)
                    .order_by(Definition.version.desc())
                    .limit(1)
                )
            ).first()
            if latest is not None and latest.content_hash == digest:
                details = {"version": latest.version, "created": False, "content_hash": digest}
                await audit(conn, actor, "definition.register", spec.name, details)
                return _definition_record(latest), False
            row = (
                await conn.execute(
                    insert(Definition)
                    .values(
                        name=spec.name,
                        version=(latest.version + 1) if latest else 1,
                        content_hash=digest,
                        spec=spec.model_dump(mode="json"),
                    )
                    .returning(Definition)
                )
            ).one()
            details = {"version": row.version, "created": True, "content_hash": digest}
            await audit(conn, actor, "definition.register", spec.name, details)
        return _definition_record(row), True

    async def get_definition(
        self, name: str, version: int | None = None
    ) -> DefinitionRecord | None:
        stmt = select(Definition).where(Definition.name == name)
        if version is None:
            stmt = stmt.order_by(Definition.version.desc()).limit(1)
        else:
            stmt = stmt.where(Definition.version == version)
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return _definition_record(row) if row else None

    async def get_definition_by_id(self, definition_id: int) -> DefinitionRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(Definition).where(Definition.id == definition_id))
            ).first()
        return _definition_record(row) if row else None

    async def list_definitions(self, limit: int, after: str | None) -> list[DefinitionRecord]:
        """The latest version of each definition, by name."""
        stmt = (
            select(Definition)
            .ext(distinct_on(Definition.name))
            .order_by(Definition.name, Definition.version.desc())
            .limit(limit)
        )
        if after is not None:
            stmt = stmt.where(Definition.name > after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_definition_record(r) for r in rows]
