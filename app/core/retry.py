"""The retry schedule: when, if ever, the next attempt of a call is due.

Delays come from tenacity's wait strategies (exponential, or exponential with full
jitter); the decision itself is a value, so the engine turns it into a row with a
due time instead of sleeping in a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenacity import RetryCallState, wait_exponential, wait_random_exponential
from tenacity.wait import wait_base

from app.core.definition import RetryPolicy


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after `delay_seconds`, or give up (`retry` false)."""

    retry: bool
    delay_seconds: float = 0.0


def _wait_for(policy: RetryPolicy) -> wait_base:
    if policy.jitter:
        return wait_random_exponential(
            multiplier=policy.initial_interval_seconds,
            exp_base=policy.backoff_coefficient,
            max=policy.max_interval_seconds,
        )
    return wait_exponential(
        multiplier=policy.initial_interval_seconds,
        exp_base=policy.backoff_coefficient,
        max=policy.max_interval_seconds,
    )


def backoff_delay(policy: RetryPolicy, attempt: int) -> float:
    """Delay after failed attempt number `attempt` (1-based).

    Without jitter: initial * coefficient**(attempt-1), capped by max_interval.
    With full jitter: uniform in [0, that value].
    """
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(_wait_for(policy)(state))


def decide_retry(
    policy: RetryPolicy, attempt: int, retryable: bool, retry_after: float | None = None
) -> RetryDecision:
    """Whether attempt `attempt` (1-based, just failed) is followed by another, and when.

    A participant's Retry-After replaces the computed delay, capped by max_interval.
    """
    if not retryable or attempt >= policy.max_attempts:
        return RetryDecision(retry=False)
    if retry_after is not None:
        return RetryDecision(True, min(max(retry_after, 0.0), policy.max_interval_seconds))
    return RetryDecision(True, backoff_delay(policy, attempt))
