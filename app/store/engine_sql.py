"""The executor's statements. Every write is fenced by (lease_owner, lease_epoch); times
come from the database clock. A lease is extended from `clock_timestamp()`, the moment
the statement runs, not from `now()`, the start of its transaction: a transaction that
first waited for a lock would otherwise commit a lease that is already expired.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

_NAME = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@dataclass(frozen=True, slots=True)
class Native:
    """A statement in PostgreSQL's own placeholders (`$1`, `$2`, …, one per name) and the
    names in their order, for the hot path on a plain psycopg pool (one text, two
    drivers, no second copy). Run on a raw cursor, nothing is parsed per call: psycopg
    caches its parse of `%(name)s` only for statements under 4 KiB with at most 50
    parameters, and COMMIT is neither, so it re-parsed 7 KiB on every outcome."""

    text: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(params[name] for name in self.names)


def native_form(statement: TextClause | str) -> Native:
    """`statement` (SQLAlchemy's `:name` placeholders) in PostgreSQL's own."""
    source = statement if isinstance(statement, str) else statement.text
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return Native(_NAME.sub(number, source), tuple(names))


# The holder of a saga extends its lease (`due_at`, when another executor may claim it,
# and `lease_expires_at`, its copy for operators) in a start or a commit only when less
# than three quarters of it are left. A step then changes no indexed column, so its
# update is HOT: the saga table's indexes get no new entries (a saga of a few seconds
# writes its due time twice: when it starts and when it ends). Renewals during a call,
# every third of a lease, always extend it; so the lease left never falls below
# 3/4 - 1/3 of it, and a call is sent within half a lease of its start's commit, before
# anyone else may claim the saga.
_LEASE_LEFT = "due_at > clock_timestamp() + make_interval(secs => :lease) * 0.75"
_LEASE_END = "clock_timestamp() + make_interval(secs => :lease)"
LEASE_DUE = f"CASE WHEN {_LEASE_LEFT} THEN due_at ELSE {_LEASE_END} END"
LEASE_EXPIRY = f"CASE WHEN {_LEASE_LEFT} THEN lease_expires_at ELSE {_LEASE_END} END"

# Claim due sagas, each with its steps (a JSON array in order): one statement, one round
# trip, in autocommit.
CLAIM = text(
    """
    WITH claimed AS (
      UPDATE sagas AS s
         SET lease_owner = :worker,
             lease_epoch = s.lease_epoch + 1,
             lease_expires_at = now() + make_interval(secs => :lease),
             due_at = now() + make_interval(secs => :lease)
        FROM (SELECT id FROM sagas
               WHERE due_at <= now() AND status IN ('running', 'compensating', 'completed')
               ORDER BY due_at
               LIMIT :limit
               FOR UPDATE SKIP LOCKED) AS due
       WHERE s.id = due.id
      RETURNING s.id, s.lease_epoch, s.definition_id, s.definition_name, s.status, s.input,
                s.deadline_at, s.cancel_requested, s.request_id, s.traceparent,
                s.waiting_reason, s.waiting_service, s.pivot_locked
    )
    SELECT claimed.*, now() AS db_now,
           (SELECT json_agg(json_build_object(
                     'name', st.name, 'status', st.status, 'attempts', st.attempts,
                     'compensation_attempts', st.compensation_attempts,
                     'maybe_applied', st.maybe_applied, 'in_flight', st.in_flight,
                     'status_code', st.status_code, 'response', st.response)
                   ORDER BY st.idx)
              FROM saga_steps AS st WHERE st.saga_id = claimed.id) AS steps
      FROM claimed
    """
)

RENEW = text(
    """
    WITH renewed AS (
      UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                       due_at = clock_timestamp() + make_interval(secs => :lease)
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
      RETURNING id
    ), slots AS (
      UPDATE service_slots SET held_until = clock_timestamp() + make_interval(secs => :lease)
       WHERE saga_id = :id AND epoch = :epoch AND EXISTS (SELECT 1 FROM renewed)
    )
    SELECT count(*) AS n FROM renewed
    """
)

# The common start: a call to a service whose breaker is closed. One statement: the
# fence, the service's version and breaker as the engine saw them, a free bulkhead slot
# (SKIP LOCKED: concurrent starts take different slots, none waits for another), then
# the attempt itself. Each guard is reported, so the engine knows what to decide next.
START_CALL = text(
    f"""
    WITH fence AS (
      SELECT id, cancel_requested FROM sagas
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
       FOR UPDATE
    ), go AS (
      SELECT id FROM fence WHERE NOT (:pivot AND cancel_requested)
    ), current AS (
      SELECT 1 FROM services AS s JOIN circuit_breakers AS cb ON cb.service = s.name
       WHERE s.name = :service AND s.version = :version AND cb.state = 'closed'
         AND EXISTS (SELECT 1 FROM go)
    ), slot AS (
      UPDATE service_slots AS sl
         SET saga_id = :id, epoch = :epoch,
             held_until = clock_timestamp() + make_interval(secs => :lease)
       WHERE (sl.service, sl.kind, sl.slot) = (
               SELECT service, kind, slot FROM service_slots
                WHERE service = :service AND kind = 'call'
                  AND (held_until IS NULL OR held_until < clock_timestamp())
                  AND EXISTS (SELECT 1 FROM current)
                LIMIT 1 FOR UPDATE SKIP LOCKED)
      RETURNING sl.slot
    ), saga AS (
      UPDATE sagas SET lease_expires_at = {LEASE_EXPIRY},
                       due_at = {LEASE_DUE},
                       updated_at = now(), waiting_reason = NULL, waiting_service = NULL,
                       pivot_locked = pivot_locked OR :pivot
       WHERE id = :id AND EXISTS (SELECT 1 FROM slot)
      RETURNING id
    ), step AS (
      UPDATE saga_steps AS st
         SET status = :status,
             attempts = st.attempts + CASE WHEN :forward THEN 1 ELSE 0 END,
             compensation_attempts = st.compensation_attempts
                                     + CASE WHEN :forward THEN 0 ELSE 1 END,
             in_flight = true,
             started_at = coalesce(st.started_at, now())
        FROM saga
       WHERE st.saga_id = saga.id AND st.idx = :idx
      RETURNING CASE WHEN :forward THEN st.attempts ELSE st.compensation_attempts END AS attempt
    ), token AS (
      INSERT INTO callback_tokens (token_hash, saga_id, step_idx, attempt, due_at)
      SELECT :token_hash, :id, :idx, attempt,
             clock_timestamp() + make_interval(secs => :callback_timeout)
        FROM step WHERE CAST(:token_hash AS text) IS NOT NULL
    ), event AS (
      INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, worker)
      SELECT :id, 'attempt_started', :step, :direction, attempt, 'started', :worker FROM step
    )
    SELECT (SELECT attempt FROM step) AS attempt,
           EXISTS (SELECT 1 FROM fence) AS ours,
           EXISTS (SELECT 1 FROM go) AS go,
           EXISTS (SELECT 1 FROM current) AS current,
           now() AS db_now
    """
)

# A callback step's attempt also stores its token's hash and due time (`token`): the
# token exists before the call is sent, so a report that beats the call's answer is
# taken, not refused.

# A call without a service (an absolute URL): no breaker, no bulkhead.
START_PLAIN = text(
    f"""
    WITH fence AS (
      SELECT id, cancel_requested FROM sagas
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
       FOR UPDATE
    ), saga AS (
      UPDATE sagas SET lease_expires_at = {LEASE_EXPIRY},
                       due_at = {LEASE_DUE},
                       updated_at = now(), waiting_reason = NULL, waiting_service = NULL,
                       pivot_locked = pivot_locked OR :pivot
       WHERE id = :id AND EXISTS (SELECT 1 FROM fence WHERE NOT (:pivot AND cancel_requested))
      RETURNING id
    ), step AS (
      UPDATE saga_steps AS st
         SET status = :status,
             attempts = st.attempts + CASE WHEN :forward THEN 1 ELSE 0 END,
             compensation_attempts = st.compensation_attempts
                                     + CASE WHEN :forward THEN 0 ELSE 1 END,
             in_flight = true,
             started_at = coalesce(st.started_at, now())
        FROM saga
       WHERE st.saga_id = saga.id AND st.idx = :idx
      RETURNING CASE WHEN :forward THEN st.attempts ELSE st.compensation_attempts END AS attempt
    ), token AS (
      INSERT INTO callback_tokens (token_hash, saga_id, step_idx, attempt, due_at)
      SELECT :token_hash, :id, :idx, attempt,
             clock_timestamp() + make_interval(secs => :callback_timeout)
        FROM step WHERE CAST(:token_hash AS text) IS NOT NULL
    ), event AS (
      INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, worker)
      SELECT :id, 'attempt_started', :step, :direction, attempt, 'started', :worker FROM step
    )
    SELECT (SELECT attempt FROM step) AS attempt,
           EXISTS (SELECT 1 FROM fence) AS ours,
           EXISTS (SELECT 1 FROM saga) AS go,
           true AS current,
           now() AS db_now
    """
)

# The probe path (a half-open breaker) serialises on the breaker's row: it is rare, and
# "exactly half_open_max_calls probes" must hold across processes.
LOCK_FENCE = text(
    """
    SELECT cancel_requested FROM sagas
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
     FOR UPDATE
    """
)
LOCK_BREAKER = text(
    """
    SELECT cb.state, cb.consecutive_failures, cb.opened_at, s.version, now() AS db_now
      FROM circuit_breakers AS cb JOIN services AS s ON s.name = cb.service
     WHERE cb.service = :service
       FOR UPDATE OF cb
    """
)
TAKE_SLOT = text(
    """
    UPDATE service_slots AS sl
       SET saga_id = :id, epoch = :epoch,
           held_until = clock_timestamp() + make_interval(secs => :lease)
     WHERE (sl.service, sl.kind, sl.slot) = (
             SELECT service, kind, slot FROM service_slots
              WHERE service = :service AND kind = :kind
                AND (held_until IS NULL OR held_until < clock_timestamp())
              LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING sl.slot
    """
)
START_HELD = text(
    f"""
    WITH saga AS (
      UPDATE sagas SET lease_expires_at = {LEASE_EXPIRY},
                       due_at = {LEASE_DUE},
                       updated_at = now(), waiting_reason = NULL, waiting_service = NULL,
                       pivot_locked = pivot_locked OR :pivot
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
      RETURNING id
    ), step AS (
      UPDATE saga_steps AS st
         SET status = :status,
             attempts = st.attempts + CASE WHEN :forward THEN 1 ELSE 0 END,
             compensation_attempts = st.compensation_attempts
                                     + CASE WHEN :forward THEN 0 ELSE 1 END,
             in_flight = true,
             started_at = coalesce(st.started_at, now())
        FROM saga
       WHERE st.saga_id = saga.id AND st.idx = :idx
      RETURNING CASE WHEN :forward THEN st.attempts ELSE st.compensation_attempts END AS attempt
    ), token AS (
      INSERT INTO callback_tokens (token_hash, saga_id, step_idx, attempt, due_at)
      SELECT :token_hash, :id, :idx, attempt,
             clock_timestamp() + make_interval(secs => :callback_timeout)
        FROM step WHERE CAST(:token_hash AS text) IS NOT NULL
    )
    INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, worker)
    SELECT :id, 'attempt_started', :step, :direction, attempt, 'started', :worker FROM step
    RETURNING attempt, now() AS db_now
    """
)

SERVICE = text(
    """
    SELECT s.*, cb.state, cb.consecutive_failures, cb.opened_at
      FROM services AS s JOIN circuit_breakers AS cb ON cb.service = s.name
     WHERE s.name = :service
    """
)

WRITE_BREAKER = text(
    """
    UPDATE circuit_breakers
       SET state = :state, consecutive_failures = :failures, opened_at = :opened_at,
           updated_at = now()
     WHERE service = :service AND state = :was_state
       AND consecutive_failures = :was_failures
       AND opened_at IS NOT DISTINCT FROM CAST(:was_opened_at AS timestamptz)
    RETURNING service
    """
)

CURRENT_BREAKER = text(
    "SELECT state, consecutive_failures, opened_at FROM circuit_breakers WHERE service = :service"
)

# Why COMMIT wrote nothing: the lease is gone, or a cancel came first.
WHY_NOT_WRITTEN = text(
    """
    SELECT lease_owner = :worker AND lease_epoch = :epoch AS ours,
           cancel_requested AND NOT pivot_locked AS cancelled, now() AS db_now
      FROM sagas WHERE id = :id
    """
)

INSERT_EVENT = text(
    """
    INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, status_code,
                             error_kind, message, duration_ms, worker)
    VALUES (:id, :type, :step, :direction, :attempt, :outcome, :status_code,
            :error_kind, :message, :duration_ms, :worker)
    """
)

INSERT_DEAD_LETTER = text(
    """
    INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                              service, attempts, last_error, request)
    SELECT :dl_id, id, definition_name, :idx, :step, :direction, :service, :attempts,
           CAST(:last_error AS jsonb), CAST(:request AS jsonb)
      FROM sagas WHERE id = :id
    ON CONFLICT (saga_id, step_idx, direction) WHERE status = 'open' DO NOTHING
    """
)

RELEASE_SLOTS = text(
    "UPDATE service_slots SET saga_id = NULL, epoch = NULL, held_until = NULL WHERE saga_id = :id"
)

RELEASE = text(
    """
    WITH released AS (
      UPDATE sagas SET lease_owner = NULL, lease_expires_at = NULL,
                       due_at = CASE WHEN :idle THEN NULL
                                     ELSE now() + make_interval(secs => :after) END
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
      RETURNING id
    ), slots AS (
      UPDATE service_slots SET saga_id = NULL, epoch = NULL, held_until = NULL
       WHERE saga_id = :id AND EXISTS (SELECT 1 FROM released)
    )
    SELECT count(*) AS n FROM released
    """
)

RECORD_CRASH = text(
    """
    UPDATE sagas SET crashes = crashes + 1, lease_owner = NULL,
           lease_expires_at = NULL, updated_at = now(),
           due_at = now() + make_interval(secs => least(60, 2 ^ crashes))
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
    RETURNING crashes
    """
)

# A saga parked `failed` by the crash limit (a completed one stays completed and is not
# notified again): its notification, if it has a target, is due at once, for any executor.
ARM_NOTIFICATION = text(
    """
    INSERT INTO notifications (saga_id, status, saga_status, attempts, due_at)
    SELECT id, 'pending', status, 0, now() FROM sagas
     WHERE id = :id AND notify IS NOT NULL AND status = 'failed'
    ON CONFLICT (saga_id) DO UPDATE
       SET status = 'pending', saga_status = EXCLUDED.saga_status, attempts = 0,
           epoch = notifications.epoch + 1, due_at = now(), last_error = NULL,
           delivered_at = NULL, updated_at = now()
    """
)

PARK = text(
    """
    UPDATE sagas SET due_at = NULL,
           status = CASE WHEN status = 'completed' THEN status ELSE 'failed' END,
           error = CASE WHEN status = 'completed' THEN error ELSE CAST(:error AS jsonb) END,
           finished_at = coalesce(finished_at, now())
     WHERE id = :id
    """
)

PRUNE_KEYS = text(
    """
    DELETE FROM idempotency_keys WHERE key IN (
      SELECT key FROM idempotency_keys WHERE expires_at < now() LIMIT :n)
    """
)


# An outcome in ONE statement (autocommit: one round trip, one transaction): the saga row,
# fenced and in the status the decision was made on, and only if that landed the step,
# the events (a JSON array, in order), the dead letter, the slot release, the breaker
# change (compare-and-set; reported) and the completion notification. A completion that
# must yield to a cancel that can still unwind writes nothing. When the decision goes
# straight on to another step's attempt, that attempt's start is part of it too (`next_*`,
# the same guards as START_CALL / START_PLAIN): a step then costs one transaction.
COMMIT = text(
    f"""
    WITH saga AS (
      UPDATE sagas
         SET status = :status,
             error = coalesce(CAST(:error AS jsonb), error),
             updated_at = now(),
             finished_at = CASE WHEN :terminal THEN coalesce(finished_at, now()) ELSE NULL END,
             due_at = CASE WHEN :keep THEN {LEASE_DUE}
                           WHEN :idle THEN NULL
                           -- a cancel that can still unwind does not wait for a backoff
                           WHEN cancel_requested AND :running
                                AND NOT (pivot_locked OR :pivot_lock) THEN now()
                           ELSE now() + make_interval(secs => :delay) END,
             lease_owner = CASE WHEN :keep THEN lease_owner ELSE NULL END,
             lease_expires_at = CASE WHEN :keep THEN {LEASE_EXPIRY} ELSE NULL END,
             waiting_reason = :waiting_reason,
             waiting_service = :waiting_service,
             pivot_locked = CASE :pivot WHEN 'lock' THEN true WHEN 'unlock' THEN false
                                 ELSE pivot_locked END,
             crashes = CASE WHEN :crashes_reset THEN 0 ELSE crashes END
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch AND status = :was
         AND NOT (:unless_cancelled AND cancel_requested AND NOT pivot_locked)
      RETURNING id, definition_name, cancel_requested, pivot_locked, deadline_at,
                notify IS NOT NULL AS notifies,
                now() AS db_now
    ), step AS (
      UPDATE saga_steps AS st
         SET status = :s_status,
             maybe_applied = :s_maybe_applied,
             in_flight = false,
             status_code = CASE WHEN :s_set_result THEN CAST(:s_status_code AS integer)
                                ELSE st.status_code END,
             response = CASE WHEN :s_set_result THEN CAST(:s_response AS jsonb)
                             ELSE st.response END,
             last_error = CASE WHEN :s_keep_error THEN st.last_error
                               ELSE CAST(:s_last_error AS jsonb) END,
             finished_at = CASE WHEN :s_finished THEN now() ELSE st.finished_at END
        FROM saga
       WHERE :has_step AND st.saga_id = saga.id AND st.idx = :s_idx
    ), go_next AS (
      -- The next attempt starts in this commit too, when the decision goes straight on
      -- and nothing stands in its way: no cancel that can unwind, the deadline not
      -- passed, and for a service the version and closed breaker the gate saw, and a
      -- free bulkhead slot (not one this saga is giving back).
      SELECT saga.id FROM saga
       WHERE :has_next AND :keep
         AND NOT (saga.cancel_requested AND NOT saga.pivot_locked)
         AND (saga.deadline_at IS NULL OR now() < saga.deadline_at)
    ), next_current AS (
      SELECT 1 FROM services AS s JOIN circuit_breakers AS cb ON cb.service = s.name
       WHERE s.name = :n_service AND s.version = :n_version AND cb.state = 'closed'
         AND EXISTS (SELECT 1 FROM go_next)
    ), next_slot AS (
      UPDATE service_slots AS sl
         SET saga_id = :id, epoch = :epoch,
             held_until = clock_timestamp() + make_interval(secs => :lease)
       WHERE (sl.service, sl.kind, sl.slot) = (
               SELECT service, kind, slot FROM service_slots
                WHERE service = :n_service AND kind = 'call'
                  AND (held_until IS NULL OR held_until < clock_timestamp())
                  AND saga_id IS DISTINCT FROM :id
                  AND EXISTS (SELECT 1 FROM next_current)
                LIMIT 1 FOR UPDATE SKIP LOCKED)
      RETURNING sl.slot
    ), next_step AS (
      UPDATE saga_steps AS st
         SET status = :n_status,
             attempts = st.attempts + CASE WHEN :n_forward THEN 1 ELSE 0 END,
             compensation_attempts = st.compensation_attempts
                                     + CASE WHEN :n_forward THEN 0 ELSE 1 END,
             in_flight = true,
             started_at = coalesce(st.started_at, now())
        FROM go_next
       WHERE st.saga_id = go_next.id AND st.idx = :n_idx
         AND (CAST(:n_service AS text) IS NULL OR EXISTS (SELECT 1 FROM next_slot))
      RETURNING CASE WHEN :n_forward THEN st.attempts ELSE st.compensation_attempts END AS attempt
    ), next_token AS (
      INSERT INTO callback_tokens (token_hash, saga_id, step_idx, attempt, due_at)
      SELECT :n_token_hash, :id, :n_idx, attempt,
             clock_timestamp() + make_interval(secs => :n_callback_timeout)
        FROM next_step WHERE CAST(:n_token_hash AS text) IS NOT NULL
    ), events AS (
      INSERT INTO saga_events (saga_id, type, step, direction, attempt, outcome, status_code,
                               error_kind, message, duration_ms, worker)
      SELECT saga.id, e.type, e.step, e.direction, e.attempt, e.outcome, e.status_code,
             e.error_kind, e.message, e.duration_ms, :worker
        FROM saga, (
          SELECT e.n, e.doc->>'type' AS type, e.doc->>'step' AS step,
                 e.doc->>'direction' AS direction,
                 CAST(e.doc->>'attempt' AS integer) AS attempt, e.doc->>'outcome' AS outcome,
                 CAST(e.doc->>'status_code' AS integer) AS status_code,
                 e.doc->>'error_kind' AS error_kind, e.doc->>'message' AS message,
                 CAST(e.doc->>'duration_ms' AS double precision) AS duration_ms
            FROM jsonb_array_elements(CAST(:events AS jsonb)) WITH ORDINALITY AS e(doc, n)
          UNION ALL  -- the next attempt's start comes last in the history
          SELECT 1000000, 'attempt_started', :n_step, :n_direction, attempt, 'started', NULL,
                 NULL, NULL, NULL
            FROM next_step
        ) AS e
       ORDER BY e.n
    ), letter AS (
      INSERT INTO dead_letters (id, saga_id, definition_name, step_idx, step_name, direction,
                                service, attempts, last_error, request)
      SELECT :dl_id, saga.id, saga.definition_name, :dl_idx, :dl_step, :dl_direction,
             :dl_service, :dl_attempts, CAST(:dl_last_error AS jsonb),
             CAST(:dl_request AS jsonb)
        FROM saga WHERE :has_letter
      ON CONFLICT (saga_id, step_idx, direction) WHERE status = 'open' DO NOTHING
    ), slots AS (
      UPDATE service_slots SET saga_id = NULL, epoch = NULL, held_until = NULL
       WHERE :release AND saga_id = :id AND EXISTS (SELECT 1 FROM saga)
    ), breaker AS (
      UPDATE circuit_breakers
         SET state = :br_state, consecutive_failures = :br_failures,
             opened_at = CAST(:br_opened_at AS timestamptz), updated_at = now()
       WHERE :has_breaker AND service = :br_service AND state = :br_was_state
         AND consecutive_failures = :br_was_failures
         AND opened_at IS NOT DISTINCT FROM CAST(:br_was_opened_at AS timestamptz)
         AND EXISTS (SELECT 1 FROM saga)
      RETURNING service
    ), note AS (
      SELECT pg_notify(:channel, CAST(saga.id AS text)) FROM saga WHERE :notify
    ), armed AS (
      -- The saga becomes terminal with a notification target: its notification is due,
      -- held by this worker for a lease (it delivers at once; a crash leaves it due).
      INSERT INTO notifications (saga_id, status, saga_status, attempts, due_at)
      SELECT saga.id, 'pending', :status, 0,
             clock_timestamp() + make_interval(secs => :lease)
        FROM saga WHERE :becomes_terminal AND saga.notifies
      ON CONFLICT (saga_id) DO UPDATE
         SET status = 'pending', saga_status = EXCLUDED.saga_status, attempts = 0,
             epoch = notifications.epoch + 1, due_at = EXCLUDED.due_at, last_error = NULL,
             delivered_at = NULL, updated_at = now()
      RETURNING epoch
    )
    SELECT saga.cancel_requested, saga.db_now,
           EXISTS (SELECT 1 FROM breaker) AS breaker_written,
           (SELECT count(*) FROM note) AS notified,
           (SELECT attempt FROM next_step) AS next_attempt,
           (SELECT epoch FROM armed) AS notification_epoch
      FROM saga
    """
)


# --- callback steps -------------------------------------------------------------------

CALLBACK_STATE = text(
    """
    SELECT report, closed_at IS NOT NULL AS closed, due_at, created_at, now() AS db_now
      FROM callback_tokens WHERE saga_id = :id AND step_idx = :idx AND attempt = :attempt
    """
)

# End a wait without a report (timeout, cancel, deadline, a cut-off attempt): only while
# neither a report nor a close is recorded; a report that came first wins (then nothing
# is written here and CALLBACK_STATE shows it).
CLOSE_CALLBACK = text(
    """
    UPDATE callback_tokens SET closed_at = now()
     WHERE saga_id = :id AND step_idx = :idx AND attempt = :attempt
       AND report IS NULL AND closed_at IS NULL
       AND EXISTS (SELECT 1 FROM sagas
                    WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch)
    RETURNING due_at, created_at, now() AS db_now
    """
)

# After the commit that makes a step wait: a report taken before it (while this worker
# still held the saga, so the report could not make it due) makes it due now.
WAKE_IF_REPORTED = text(
    """
    UPDATE sagas SET due_at = now()
     WHERE id = :id AND lease_owner IS NULL AND due_at IS NOT NULL
       AND EXISTS (SELECT 1 FROM callback_tokens
                    WHERE saga_id = :id AND step_idx = :idx AND attempt = :attempt
                      AND report IS NOT NULL)
    RETURNING id
    """
)

CLOSE_CALLBACKS = text(
    """
    UPDATE callback_tokens SET closed_at = now()
     WHERE saga_id = :id AND report IS NULL AND closed_at IS NULL
    """
)
