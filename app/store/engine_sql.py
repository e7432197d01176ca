"""The executor's statements. Every write is fenced by (lease_owner, lease_epoch); times
come from the database clock. A lease is extended from `clock_timestamp()`, the moment
the statement runs, not from `now()`, the start of its transaction: a transaction that
first waited for a lock would otherwise commit a lease that is already expired.
"""

from __future__ import annotations

from sqlalchemy import text

CLAIM = text(
    """
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
              s.waiting_reason, s.waiting_service, s.pivot_locked, now() AS db_now
    """
)

CLAIMED_STEPS = text(
    """
    SELECT saga_id, idx, name, status, attempts, compensation_attempts, maybe_applied,
           in_flight, status_code, response
      FROM saga_steps WHERE saga_id = ANY(:ids) ORDER BY saga_id, idx
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
    """
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
      UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                       due_at = clock_timestamp() + make_interval(secs => :lease),
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

# A call without a service (an absolute URL): no breaker, no bulkhead.
START_PLAIN = text(
    """
    WITH fence AS (
      SELECT id, cancel_requested FROM sagas
       WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch
       FOR UPDATE
    ), saga AS (
      UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                       due_at = clock_timestamp() + make_interval(secs => :lease),
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
    """
    WITH saga AS (
      UPDATE sagas SET lease_expires_at = clock_timestamp() + make_interval(secs => :lease),
                       due_at = clock_timestamp() + make_interval(secs => :lease),
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

# An outcome: the saga row, fenced, in the status the decision was made on; a completion
# that must yield to a cancel that can still unwind writes nothing.
WRITE_SAGA = text(
    """
    UPDATE sagas
       SET status = :status,
           error = coalesce(CAST(:error AS jsonb), error),
           updated_at = now(),
           finished_at = CASE WHEN :terminal THEN coalesce(finished_at, now()) ELSE NULL END,
           due_at = CASE WHEN :keep THEN clock_timestamp() + make_interval(secs => :lease)
                         WHEN :idle THEN NULL
                         -- a cancel that can still unwind does not wait for a backoff
                         WHEN cancel_requested AND :running
                              AND NOT (pivot_locked OR :pivot_lock) THEN now()
                         ELSE now() + make_interval(secs => :delay) END,
           lease_owner = CASE WHEN :keep THEN lease_owner ELSE NULL END,
           lease_expires_at = CASE WHEN :keep
                                   THEN clock_timestamp() + make_interval(secs => :lease)
                                   ELSE NULL END,
           waiting_reason = :waiting_reason,
           waiting_service = :waiting_service,
           pivot_locked = CASE :pivot WHEN 'lock' THEN true WHEN 'unlock' THEN false
                               ELSE pivot_locked END,
           crashes = CASE WHEN :crashes_reset THEN 0 ELSE crashes END
     WHERE id = :id AND lease_owner = :worker AND lease_epoch = :epoch AND status = :was
       AND NOT (:unless_cancelled AND cancel_requested AND NOT pivot_locked)
    RETURNING cancel_requested, now() AS db_now
    """
)

WHY_NOT_WRITTEN = text(
    """
    SELECT lease_owner = :worker AND lease_epoch = :epoch AS ours,
           cancel_requested AND NOT pivot_locked AS cancelled, now() AS db_now
      FROM sagas WHERE id = :id
    """
)

WRITE_STEP = text(
    """
    UPDATE saga_steps
       SET status = :status,
           maybe_applied = :maybe_applied,
           in_flight = false,
           status_code = CASE WHEN :set_result THEN CAST(:status_code AS integer)
                              ELSE status_code END,
           response = CASE WHEN :set_result THEN CAST(:response AS jsonb) ELSE response END,
           last_error = CASE WHEN :keep_error THEN last_error
                             ELSE CAST(:last_error AS jsonb) END,
           finished_at = CASE WHEN :finished THEN now() ELSE finished_at END
     WHERE saga_id = :id AND idx = :idx
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
