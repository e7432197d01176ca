"""The saga API's hot path: starting a saga in one statement and reading its view in one
statement, rendered straight to the JSON the API answers (no ORM rows, no response
model to validate; stored JSON is passed through as it is).

The JSON is the same document `SagaOut` describes: the same fields, timestamps as
RFC 3339 in UTC with a `Z`, stored JSON values verbatim.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

import orjson
from psycopg import AsyncRawCursor
from psycopg.errors import UniqueViolation
from psycopg.rows import namedtuple_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from app.core.states import SagaStatus
from app.core.views import Handoff, NewSaga, SagaDocument, StartResult
from app.store.engine_sql import native_form
from app.store.sagas import SAGA_WORK_CHANNEL

NULL = orjson.Fragment(b"null")
_BUSY_TRIES = 3
_DUMP = orjson.OPT_UTC_Z


_START = native_form(
    """
WITH fresh AS (
  -- A start on the latest version of a definition, as this process last knew it: no
  -- newer version registered since (else nothing is written and it looks again).
  SELECT NOT (:latest AND EXISTS (
           SELECT 1 FROM definitions
            WHERE name = :name AND version > :version)) AS ok
), key AS (
  INSERT INTO idempotency_keys (key, fingerprint, saga_id, expires_at)
  SELECT :key, :fingerprint, :id, now() + make_interval(secs => :ttl)
   WHERE :key::text IS NOT NULL AND (SELECT ok FROM fresh)
  ON CONFLICT (key) DO UPDATE
     SET fingerprint = EXCLUDED.fingerprint, saga_id = EXCLUDED.saga_id,
         created_at = now(), expires_at = EXCLUDED.expires_at
   WHERE idempotency_keys.expires_at < now()
  RETURNING saga_id
), saga AS (
  INSERT INTO sagas (id, definition_id, definition_name, definition_version, status, input,
                     idempotency_key, deadline_at, request_id, traceparent, due_at,
                     lease_owner, lease_epoch, lease_expires_at, business_key, labels,
                     exclusive, notify)
  SELECT :id, :definition_id, :name, :version, 'running', :input, :key,
         now() + make_interval(secs => :timeout), :request_id, :traceparent,
         CASE WHEN :owner::text IS NULL THEN now()
              ELSE now() + make_interval(secs => :lease) END,
         :owner, CASE WHEN :owner::text IS NULL THEN 0 ELSE 1 END,
         CASE WHEN :owner::text IS NULL THEN NULL
              ELSE now() + make_interval(secs => :lease) END,
         :business_key, :labels, :exclusive, :notify
   WHERE (SELECT ok FROM fresh) AND (:key::text IS NULL OR EXISTS (SELECT 1 FROM key))
  RETURNING id, created_at, updated_at, deadline_at, now() AS db_now
), first_current AS (
  -- The first attempt starts here too, for the executor this saga is handed to, when
  -- the guards of an attempt's start hold: the service as the executor saw it (version,
  -- breaker closed) and a free bulkhead slot (SKIP LOCKED, as START_CALL).
  SELECT 1 FROM services AS s JOIN circuit_breakers AS cb ON cb.service = s.name
   WHERE s.name = :f_service AND s.version = :f_version AND cb.state = 'closed'
     AND EXISTS (SELECT 1 FROM saga)
), first_slot AS (
  UPDATE service_slots AS sl
     SET saga_id = :id, epoch = 1,
         held_until = clock_timestamp() + make_interval(secs => :lease)
   WHERE (sl.service, sl.kind, sl.slot) = (
           SELECT service, kind, slot FROM service_slots
            WHERE service = :f_service AND kind = 'call'
              AND (held_until IS NULL OR held_until < clock_timestamp())
              AND EXISTS (SELECT 1 FROM first_current)
            LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING sl.slot
), first AS (
  SELECT saga.id FROM saga
   WHERE :first AND (:f_service::text IS NULL OR EXISTS (SELECT 1 FROM first_slot))
), steps AS (
  INSERT INTO saga_steps (saga_id, idx, name, status, attempts, in_flight, started_at)
  SELECT saga.id, s.idx - 1, s.name,
         CASE WHEN s.idx = 1 AND first.id IS NOT NULL THEN 'running' ELSE 'pending' END,
         CASE WHEN s.idx = 1 AND first.id IS NOT NULL THEN 1 ELSE 0 END,
         s.idx = 1 AND first.id IS NOT NULL,
         CASE WHEN s.idx = 1 AND first.id IS NOT NULL THEN now() END
    FROM saga LEFT JOIN first ON true,
         unnest(:steps::text[]) WITH ORDINALITY AS s(name, idx)
), event AS (
  INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, worker)
  SELECT e.saga_id, e.type, e.step, e.direction, e.attempt, e.outcome, e.worker
    FROM (SELECT 1 AS n, id AS saga_id, 'saga_started' AS type, NULL AS step,
                 NULL AS direction, NULL::integer AS attempt, NULL AS outcome,
                 NULL AS worker
            FROM saga
          UNION ALL
          SELECT 2, id, 'attempt_started', :f_step, 'action', 1, 'started', :owner
            FROM first) AS e
   ORDER BY e.n
), notified AS (
  SELECT pg_notify(:channel, '') FROM saga WHERE :owner::text IS NULL
)
SELECT (SELECT ok FROM fresh) AS fresh, saga.*,
       EXISTS (SELECT 1 FROM first) AS first_started,
       (SELECT count(*) FROM notified) AS notified
  FROM (SELECT 1) AS one LEFT JOIN saga ON true
"""
)

_KEY = "SELECT fingerprint, saga_id FROM idempotency_keys WHERE key = %(key)s"

# The saga that holds an exclusive definition's business key (`uq_sagas_exclusive`).
EXCLUSIVE_INDEX = "uq_sagas_exclusive"
_HOLDER = """
SELECT id FROM sagas
 WHERE definition_name = %(name)s AND business_key = %(business_key)s
   AND exclusive AND status IN ('running', 'compensating')
"""

# Every saga has at least one step: one row per step, the saga's columns on each.
_VIEW = native_form(
    """
SELECT s.id, s.definition_name, s.definition_version, s.status, s.input::text AS input,
       s.idempotency_key, s.created_at, s.updated_at, s.finished_at, s.deadline_at,
       s.cancel_requested, s.error::text AS error, s.business_key, s.labels::text AS labels,
       st.name AS step_name, st.status AS step_status, st.attempts, st.compensation_attempts,
       st.status_code, st.response::text AS response, st.last_error::text AS last_error,
       st.started_at, st.finished_at AS step_finished_at, ct.due_at AS callback_due_at,
       now() AS db_now, s.notify IS NOT NULL AS notifies, n.status AS notification_status,
       n.attempts AS notification_attempts
  FROM sagas AS s JOIN saga_steps AS st ON st.saga_id = s.id
  LEFT JOIN callback_tokens AS ct
    ON st.status = 'waiting' AND ct.saga_id = st.saga_id AND ct.step_idx = st.idx
   AND ct.attempt = st.attempts
  LEFT JOIN notifications AS n ON n.saga_id = s.id
 WHERE s.id = :id
 ORDER BY st.idx
"""
)


def notification(notifies: bool, status: str | None, attempts: int | None) -> Any:
    """The view's `notification`: null without a target; pending with no attempts until
    the saga is terminal and its notification armed."""
    if not notifies:
        return None
    return {"status": status or "pending", "attempts": attempts or 0}


def _raw(text: str | None) -> orjson.Fragment:
    return NULL if text is None else orjson.Fragment(text.encode())


def _json(value: Any) -> orjson.Fragment:
    """Any JSON value as a fragment (stdlib json: integers of any size, as jsonb keeps)."""
    return orjson.Fragment(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


class SagaDocuments:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def start(
        self, new: NewSaga, handoff: Handoff | None = None
    ) -> tuple[StartResult, SagaDocument | uuid.UUID]:
        """Create a saga in one statement (the key, the saga, its steps, its first event,
        and the executors' wake-up, or the handoff to this process's executor, with its
        first attempt started when `handoff.first` says so and its guards hold). With an
        Idempotency-Key, at most one saga per key, ever: a concurrent request with the
        same key waits for this one's statement and then finds its key taken.

        CREATED comes with the new saga's document (nothing to read back); REPLAYED and
        MISMATCH with the id of the saga the key already started; BUSY (an exclusive
        definition) with the id of the non-terminal saga that holds the business key. The
        unique index decides BUSY, so concurrent starts on any replica create one saga;
        the refused statement stores nothing, its Idempotency-Key included. STALE: a newer
        version of the definition than `new.definition` exists and `new.latest` asked for
        the latest; nothing is stored."""
        saga_id = uuid.uuid4()
        spec = new.definition.spec
        first = handoff.first if handoff else None
        params: dict[str, Any] = {
            "key": new.idempotency_key,
            "fingerprint": new.fingerprint,
            "ttl": new.key_ttl_seconds,
            "id": saga_id,
            "definition_id": new.definition.id,
            "name": new.definition.name,
            "version": new.definition.version,
            "input": Jsonb(new.input),
            "timeout": spec.timeout_seconds,
            "request_id": new.request_id,
            # Without a caller's trace, the saga is its own trace: all its calls join it.
            "traceparent": new.traceparent or f"00-{saga_id.hex}-{secrets.token_hex(8)}-01",
            "owner": handoff.worker if handoff else None,
            "lease": handoff.lease_seconds if handoff else 0,
            "steps": [s.name for s in spec.steps],
            "channel": SAGA_WORK_CHANNEL,
            "business_key": new.business_key,
            "labels": Jsonb(new.labels),
            "exclusive": spec.exclusive,
            "notify": Jsonb(new.notify) if new.notify is not None else None,
            "latest": new.latest,
            "first": first is not None,
            "f_step": first.step_name if first else None,
            "f_service": first.service if first else None,
            "f_version": first.version if first else None,
        }
        async with (
            self.pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=namedtuple_row) as cur,
            conn.cursor(row_factory=namedtuple_row) as other,
        ):
            for _ in range(_BUSY_TRIES):
                try:
                    await cur.execute(_START.text, _START.args(params))
                except UniqueViolation as exc:
                    if exc.diag.constraint_name != EXCLUSIVE_INDEX:
                        raise
                    # Another non-terminal saga holds the key; it may have ended since.
                    await other.execute(_HOLDER, params)
                    holder: Any = await other.fetchone()
                    if holder is not None:
                        return StartResult.BUSY, holder.id
                    continue
                break
            else:
                raise RuntimeError("the business key stays taken by sagas that end at once")
            row: Any = await cur.fetchone()
            if not row.fresh:
                return StartResult.STALE, saga_id
            if row.id is None:
                await other.execute(_KEY, {"key": new.idempotency_key})
                existing: Any = await other.fetchone()
                assert existing is not None, "a key that is neither new nor stored"
                result = (
                    StartResult.REPLAYED
                    if existing.fingerprint == new.fingerprint
                    else StartResult.MISMATCH
                )
                return result, existing.saga_id
        started = bool(row.first_started)
        document = {
            "id": saga_id,
            "definition": new.definition.name,
            "definition_version": new.definition.version,
            "status": SagaStatus.RUNNING.value,
            "input": _json(new.input),
            "idempotency_key": new.idempotency_key,
            "business_key": new.business_key,
            "labels": new.labels,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "finished_at": None,
            "deadline_at": row.deadline_at,
            "cancel_requested": False,
            "error": None,
            "notification": notification(new.notify is not None, None, None),
            "steps": [
                {
                    "name": s.name,
                    "status": "running" if i == 0 and started else "pending",
                    "attempts": 1 if i == 0 and started else 0,
                    "compensation_attempts": 0,
                    "status_code": None,
                    "response": None,
                    "last_error": None,
                    "started_at": row.created_at if i == 0 and started else None,
                    "finished_at": None,
                    "callback_due_at": None,
                }
                for i, s in enumerate(spec.steps)
            ],
        }
        body = orjson.dumps(document, option=_DUMP)
        return StartResult.CREATED, SagaDocument(
            saga_id,
            new.definition.name,
            SagaStatus.RUNNING,
            body,
            row.db_now,
            row.deadline_at,
            params["traceparent"],
            first_attempt=started,
        )

    async def view(self, saga_id: uuid.UUID) -> SagaDocument | None:
        """The saga's view, read in one statement."""
        async with (
            self.pool.connection() as conn,
            AsyncRawCursor(conn, row_factory=namedtuple_row) as cur,
        ):
            await cur.execute(_VIEW.text, _VIEW.args({"id": saga_id}))
            rows: list[Any] = await cur.fetchall()
        if not rows:
            return None
        first = rows[0]
        document = {
            "id": first.id,
            "definition": first.definition_name,
            "definition_version": first.definition_version,
            "status": first.status,
            "input": _raw(first.input),
            "idempotency_key": first.idempotency_key,
            "business_key": first.business_key,
            "labels": _raw(first.labels),
            "created_at": first.created_at,
            "updated_at": first.updated_at,
            "finished_at": first.finished_at,
            "deadline_at": first.deadline_at,
            "cancel_requested": first.cancel_requested,
            "error": _raw(first.error),
            "notification": notification(
                first.notifies, first.notification_status, first.notification_attempts
            ),
            "steps": [
                {
                    "name": r.step_name,
                    "status": r.step_status,
                    "attempts": r.attempts,
                    "compensation_attempts": r.compensation_attempts,
                    "status_code": r.status_code,
                    "response": _raw(r.response),
                    "last_error": _raw(r.last_error),
                    "started_at": r.started_at,
                    "finished_at": r.step_finished_at,
                    "callback_due_at": r.callback_due_at,
                }
                for r in rows
            ],
        }
        return SagaDocument(
            first.id,
            first.definition_name,
            SagaStatus(first.status),
            orjson.dumps(document, option=_DUMP),
            first.db_now,
        )
