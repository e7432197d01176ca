"""The retry schedule: when, if ever, the next attempt of a call is due.

Delays come from tenacity's exponential wait strategy, drawn uniformly below it with
full jitter; the decision itself is a value, so the engine turns it into a row with a
due time instead of sleeping in a worker.

`delay_bounds` is the interval a delay is drawn from; `Draw` picks the delay in it.
The executor draws at random; the failure plan (`app.core.plan`) asks the same
decisions with the draw pinned to either end, which gives the bounds of its windows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import RetryCallState, wait_exponential

from app.core.definition import RetryPolicy

Draw = Callable[[float, float], float]
"""Picks a delay in [low, high]: `random.uniform` at run time."""


def earliest(low: float, high: float) -> float:
    """The draw of the shortest delays (the failure plan's lower bounds)."""
    return low


def latest(low: float, high: float) -> float:
    """The draw of the longest delays (the failure plan's upper bounds)."""
    return high


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Retry after `delay_seconds`, or give up (`retry` false)."""

    retry: bool
    delay_seconds: float = 0.0


def delay_bounds(policy: RetryPolicy, attempt: int) -> tuple[float, float]:
    """The interval the delay after failed attempt number `attempt` (1-based) lies in.

    Without jitter: exactly initial * coefficient**(attempt-1), capped by max_interval.
    With full jitter: [0, that value].
    """
    wait = wait_exponential(
        multiplier=policy.initial_interval_seconds,
        exp_base=policy.backoff_coefficient,
        max=policy.max_interval_seconds,
    )
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    high = float(wait(state))
    return (0.0 if policy.jitter else high), high


def backoff_delay(policy: RetryPolicy, attempt: int, draw: Draw = random.uniform) -> float:
    """Delay after failed attempt number `attempt` (1-based): drawn in `delay_bounds`
    (uniformly at random with full jitter, as tenacity's `wait_random_exponential`)."""
    low, high = delay_bounds(policy, attempt)
    return low if low == high else draw(low, high)


def decide_retry(
    policy: RetryPolicy,
    attempt: int,
    retryable: bool,
    retry_after: float | None = None,
    draw: Draw = random.uniform,
) -> RetryDecision:
    """Whether attempt `attempt` (1-based, just failed) is followed by another, and when.

    A participant's Retry-After replaces the computed delay, capped by max_interval.
    """
    if not retryable or attempt >= policy.max_attempts:
        return RetryDecision(retry=False)
    if retry_after is not None:
        return RetryDecision(True, min(max(retry_after, 0.0), policy.max_interval_seconds))
    return RetryDecision(True, backoff_delay(policy, attempt, draw))
