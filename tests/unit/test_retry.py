"""The retry schedule: exponential backoff, full jitter, Retry-After, attempt limits."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from app.core.definition import RetryPolicy
from app.core.retry import RetryDecision, backoff_delay, decide_retry


@pytest.fixture(autouse=True)
def _seeded_random() -> Iterator[None]:
    """Jitter draws from the `random` module: make sampling reproducible, then restore."""
    saved = random.getstate()
    random.seed(20250301)
    yield
    random.setstate(saved)


def policy(**fields: object) -> RetryPolicy:
    return RetryPolicy.model_validate(fields)


# --- backoff without jitter: exact ------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, 1.0),
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 32.0),
        (7, 60.0),
        (8, 60.0),
        (50, 60.0),
    ],
)
def test_default_schedule_without_jitter(attempt: int, expected: float) -> None:
    assert backoff_delay(policy(jitter=False), attempt) == expected


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.5), (3, 4.5), (4, 10.0), (5, 10.0)],
)
def test_custom_schedule_without_jitter(attempt: int, expected: float) -> None:
    p = policy(
        jitter=False, initial_interval_seconds=0.5, backoff_coefficient=3, max_interval_seconds=10
    )
    assert backoff_delay(p, attempt) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("attempt", [1, 2, 5, 20])
def test_coefficient_one_is_a_constant_delay(attempt: int) -> None:
    p = policy(jitter=False, initial_interval_seconds=0.2, backoff_coefficient=1)
    assert backoff_delay(p, attempt) == pytest.approx(0.2)


def test_first_retry_waits_exactly_the_initial_interval() -> None:
    p = policy(jitter=False, initial_interval_seconds=0.2, max_interval_seconds=10)
    assert backoff_delay(p, 1) == pytest.approx(0.2)


def test_initial_equal_to_max_is_constant() -> None:
    p = policy(jitter=False, initial_interval_seconds=3, max_interval_seconds=3)
    assert [backoff_delay(p, n) for n in (1, 2, 3)] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("jitter", [False, True])
def test_huge_attempt_numbers_do_not_overflow(jitter: bool) -> None:
    p = policy(jitter=jitter, max_attempts=1000, backoff_coefficient=100, max_interval_seconds=60)
    delay = backoff_delay(p, 1000)
    assert 0.0 <= delay <= 60.0
    if not jitter:
        assert delay == 60.0


# --- backoff with full jitter: bounded ----------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8])
def test_full_jitter_stays_within_the_cap(attempt: int) -> None:
    p = policy(
        jitter=True, initial_interval_seconds=0.5, backoff_coefficient=2, max_interval_seconds=5
    )
    cap = min(0.5 * 2 ** (attempt - 1), 5.0)
    samples = [backoff_delay(p, attempt) for _ in range(2000)]
    assert all(0.0 <= d <= cap for d in samples)
    # Full jitter spreads over the whole range, not a fixed value near the cap.
    assert len(set(samples)) > 1900
    assert min(samples) < cap * 0.05
    assert max(samples) > cap * 0.95
    assert 0.4 * cap < sum(samples) / len(samples) < 0.6 * cap


def test_jitter_differs_from_the_exact_schedule() -> None:
    p = policy(jitter=True)
    samples = {backoff_delay(p, 3) for _ in range(50)}
    assert samples != {4.0}


# --- decide_retry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, RetryDecision(True, 1.0)),
        (2, RetryDecision(True, 2.0)),
        (3, RetryDecision(False)),
        (4, RetryDecision(False)),
    ],
)
def test_stops_at_max_attempts(attempt: int, expected: RetryDecision) -> None:
    assert decide_retry(policy(jitter=False, max_attempts=3), attempt, True) == expected


def test_give_up_has_no_delay() -> None:
    assert decide_retry(policy(max_attempts=2), 2, True) == RetryDecision(
        retry=False, delay_seconds=0.0
    )


def test_max_attempts_one_never_retries() -> None:
    assert decide_retry(policy(max_attempts=1), 1, True) == RetryDecision(False)
    assert decide_retry(policy(max_attempts=1), 1, True, retry_after=1) == RetryDecision(False)


@pytest.mark.parametrize("attempt", [1, 2, 5])
@pytest.mark.parametrize("retry_after", [None, 0.0, 3.0])
def test_non_retryable_is_never_retried(attempt: int, retry_after: float | None) -> None:
    assert decide_retry(policy(max_attempts=10), attempt, False, retry_after) == RetryDecision(
        False
    )


def test_jittered_decision_is_within_the_cap() -> None:
    p = policy(jitter=True, max_attempts=10, initial_interval_seconds=1, max_interval_seconds=60)
    for attempt in range(1, 10):
        cap = min(2.0 ** (attempt - 1), 60.0)
        for _ in range(100):
            decision = decide_retry(p, attempt, True)
            assert decision.retry is True
            assert 0.0 <= decision.delay_seconds <= cap


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (7.5, 7.5),  # used as given
        (0.1, 0.1),  # even when shorter than the computed backoff
        (0.0, 0.0),
        (60.0, 60.0),
        (61.0, 60.0),  # capped by max_interval_seconds
        (86400.0, 60.0),
        (-5.0, 0.0),  # never negative
    ],
)
def test_retry_after_is_honoured_and_capped(retry_after: float, expected: float) -> None:
    p = policy(jitter=False, initial_interval_seconds=5, max_interval_seconds=60)
    assert decide_retry(p, 1, True, retry_after) == RetryDecision(True, expected)


def test_retry_after_cap_follows_the_policy() -> None:
    p = policy(initial_interval_seconds=0.2, max_interval_seconds=10)
    assert decide_retry(p, 2, True, 30) == RetryDecision(True, 10.0)


def test_retry_after_ignored_once_attempts_are_spent() -> None:
    assert decide_retry(policy(max_attempts=3), 3, True, 1.0) == RetryDecision(False)
