"""Circuit breaker and bulkhead rules, as pure functions over a snapshot of shared state.

The state lives in PostgreSQL so every executor process sees one breaker per service;
the store locks the row, asks `admit` or `after_call`, and writes back what they say.
In-flight calls are counted from live leases, so a crashed process's calls stop
counting when its leases expire: no counter can leak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from app.domain.definition import CircuitBreakerConfig
from app.domain.states import CircuitState, ErrorKind
from app.resilience.outcome import Outcome

# How soon a saga turned away by a full bulkhead or a busy half-open probe looks again.
BULKHEAD_RECHECK_SECONDS = 0.25
HALF_OPEN_RECHECK_SECONDS = 1.0


class WaitReason(StrEnum):
    CIRCUIT_OPEN = "circuit_open"
    HALF_OPEN_BUSY = "half_open_probe_in_flight"
    BULKHEAD_FULL = "bulkhead_full"


@dataclass(frozen=True, slots=True)
class Breaker:
    state: CircuitState
    consecutive_failures: int
    opened_at: datetime | None


@dataclass(frozen=True, slots=True)
class Admission:
    """Either the call may go (`admitted`, possibly as a half-open `probe`) or it waits."""

    admitted: bool
    breaker: Breaker  # the breaker after this decision (open may have become half-open)
    probe: bool = False
    wait: WaitReason | None = None
    retry_at: datetime | None = None


def admit(
    config: CircuitBreakerConfig,
    breaker: Breaker,
    now: datetime,
    live_calls: int,
    live_probes: int,
    max_concurrency: int,
) -> Admission:
    """May one more call go to this service now?"""
    if breaker.state is CircuitState.OPEN:
        reopen_at = (breaker.opened_at or now) + timedelta(seconds=config.recovery_timeout_seconds)
        if now < reopen_at:
            return Admission(False, breaker, wait=WaitReason.CIRCUIT_OPEN, retry_at=reopen_at)
        breaker = replace(breaker, state=CircuitState.HALF_OPEN)
    if breaker.state is CircuitState.HALF_OPEN:
        if live_probes >= config.half_open_max_calls or live_calls >= max_concurrency:
            recheck = min(HALF_OPEN_RECHECK_SECONDS, config.recovery_timeout_seconds)
            return Admission(
                False,
                breaker,
                wait=WaitReason.HALF_OPEN_BUSY,
                retry_at=now + timedelta(seconds=recheck),
            )
        return Admission(True, breaker, probe=True)
    if live_calls >= max_concurrency:
        return Admission(
            False,
            breaker,
            wait=WaitReason.BULKHEAD_FULL,
            retry_at=now + timedelta(seconds=BULKHEAD_RECHECK_SECONDS),
        )
    return Admission(True, breaker)


def counts_as_failure(outcome: Outcome) -> bool:
    """Timeouts, connection errors, retryable statuses and 5xx count; other 4xx do not
    (the caller's fault), and neither does a request that could not be built or an
    answer that was only too large (the service is up)."""
    if outcome.success or outcome.error_kind in (
        ErrorKind.TEMPLATE,
        ErrorKind.BLOCKED,
        ErrorKind.RESPONSE_TOO_LARGE,
    ):
        return False
    return outcome.retryable or outcome.maybe_applied


def after_call(
    config: CircuitBreakerConfig, breaker: Breaker, now: datetime, failed: bool
) -> Breaker:
    """The breaker after a call to the service finished (success or counted failure)."""
    if not failed:
        if breaker.state is CircuitState.OPEN:
            return breaker  # a late answer to a call made before the circuit opened
        return Breaker(CircuitState.CLOSED, 0, None)
    failures = breaker.consecutive_failures + 1
    if breaker.state is CircuitState.HALF_OPEN:
        return Breaker(CircuitState.OPEN, failures, now)
    if breaker.state is CircuitState.CLOSED and failures >= config.failure_threshold:
        return Breaker(CircuitState.OPEN, failures, now)
    return replace(breaker, consecutive_failures=failures)
