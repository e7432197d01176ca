"""Circuit breaker and bulkhead rules, as pure functions over a snapshot of shared state.

The state lives in PostgreSQL so every executor process sees one breaker per service.
The engine asks `gate` whether a call may go on the breaker it last saw; the store then
starts the attempt only if that still holds (the breaker unchanged, a bulkhead slot free),
and reports what it found otherwise. After a call, `after_call` gives the breaker's next
state, which the store writes with compare-and-set. Bulkhead slots and half-open probe
slots are rows held under the saga's lease, so a crashed process's slots free themselves
when its leases expire: no counter can leak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from app.core.definition import CircuitBreakerConfig
from app.core.outcome import Outcome
from app.core.states import CircuitState, ErrorKind, WaitReason

# How soon a saga turned away by a full bulkhead or a busy half-open probe looks again.
BULKHEAD_RECHECK_SECONDS = 0.25
HALF_OPEN_RECHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Breaker:
    state: CircuitState
    consecutive_failures: int
    opened_at: datetime | None


class Passage(StrEnum):
    CALL = "call"  # closed: the call may go, if a bulkhead slot is free
    PROBE = "probe"  # half-open: the call may go as a probe, if a probe slot is free too
    WAIT = "wait"  # open: no call until `retry_at`


@dataclass(frozen=True, slots=True)
class Gate:
    passage: Passage
    breaker: Breaker  # the breaker after this decision: an open one past its recovery
    # timeout becomes half-open
    retry_at: datetime | None = None


def gate(config: CircuitBreakerConfig, breaker: Breaker, now: datetime) -> Gate:
    """How a call to the service may go, judged on its breaker alone."""
    if breaker.state is CircuitState.OPEN:
        reopen_at = (breaker.opened_at or now) + timedelta(seconds=config.recovery_timeout_seconds)
        if now < reopen_at:
            return Gate(Passage.WAIT, breaker, retry_at=reopen_at)
        return Gate(Passage.PROBE, replace(breaker, state=CircuitState.HALF_OPEN))
    if breaker.state is CircuitState.HALF_OPEN:
        return Gate(Passage.PROBE, breaker)
    return Gate(Passage.CALL, breaker)


def recheck_after(reason: WaitReason, config: CircuitBreakerConfig) -> float:
    """How soon a saga turned away by a full bulkhead or a busy probe looks again."""
    if reason is WaitReason.HALF_OPEN_BUSY:
        return min(HALF_OPEN_RECHECK_SECONDS, config.recovery_timeout_seconds)
    return BULKHEAD_RECHECK_SECONDS


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
