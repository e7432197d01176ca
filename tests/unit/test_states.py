"""Statuses, error kinds and the legal transitions between statuses (contract section 5)."""

from __future__ import annotations

import itertools

import pytest

from app.core.states import (
    SAGA_TRANSITIONS,
    STEP_TRANSITIONS,
    TERMINAL_SAGA,
    ErrorKind,
    SagaStatus,
    StepStatus,
    saga_can_move,
    step_can_move,
)

S = SagaStatus
T = StepStatus

# Written out from the contract, independently of the tables under test.
LEGAL_SAGA_MOVES = {
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.COMPENSATING),
    (S.RUNNING, S.FAILED),  # a critical step after the pivot is parked as a dead letter
    (S.COMPENSATING, S.COMPENSATED),
    (S.COMPENSATING, S.FAILED),  # a compensation exhausted its retries
    (S.FAILED, S.RUNNING),  # an operator pushes a parked saga forward
    (S.FAILED, S.COMPENSATING),  # an operator retries a failed compensation
}

LEGAL_STEP_MOVES = {
    (T.PENDING, T.RUNNING),
    (T.PENDING, T.FAILED),
    (T.RUNNING, T.RUNNING),  # another attempt
    (T.RUNNING, T.SUCCEEDED),
    (T.RUNNING, T.FAILED),
    (T.RUNNING, T.FALLBACK),
    (T.RUNNING, T.WAITING),  # a callback step's participant answered 202
    (T.WAITING, T.SUCCEEDED),  # reported success
    (T.WAITING, T.FAILED),  # reported failure, or no report and no attempts left
    (T.WAITING, T.FALLBACK),
    (T.WAITING, T.RUNNING),  # no report in time: another attempt, with a new token
    (T.SUCCEEDED, T.COMPENSATING),
    (T.FAILED, T.COMPENSATING),  # outcome unknown: compensated on unwind
    (T.FAILED, T.RUNNING),  # operator retry
    (T.FALLBACK, T.COMPENSATING),
    (T.COMPENSATING, T.COMPENSATING),  # another compensation attempt
    (T.COMPENSATING, T.COMPENSATED),
    (T.COMPENSATING, T.COMPENSATION_FAILED),
    (T.COMPENSATION_FAILED, T.COMPENSATING),  # operator retry
}


def test_saga_status_values_match_contract() -> None:
    assert {s.value for s in SagaStatus} == {
        "running",
        "compensating",
        "completed",
        "compensated",
        "failed",
    }


def test_step_status_values_match_contract() -> None:
    assert {s.value for s in StepStatus} == {
        "pending",
        "running",
        "waiting",  # v1.1
        "succeeded",
        "failed",
        "fallback",
        "compensating",
        "compensated",
        "compensation_failed",
    }


def test_error_kind_values_match_contract() -> None:
    # Contract v1.1 adds blocked, callback_failed and response_too_large.
    assert {k.value for k in ErrorKind} == {
        "blocked",
        "callback_failed",
        "response_too_large",
        "http_status",
        "timeout",
        "connection",
        "circuit_open",
        "template",
        "deadline",
        "cancelled",
    }


def test_statuses_are_strings() -> None:
    assert SagaStatus("compensating") is SagaStatus.COMPENSATING
    assert StepStatus.COMPENSATION_FAILED == "compensation_failed"
    assert f"{ErrorKind.CIRCUIT_OPEN}" == "circuit_open"


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        (S.RUNNING, False),
        (S.COMPENSATING, False),
        (S.COMPLETED, True),
        (S.COMPENSATED, True),
        (S.FAILED, True),
    ],
)
def test_terminal_sagas(status: SagaStatus, terminal: bool) -> None:
    assert status.terminal is terminal
    assert (status in TERMINAL_SAGA) is terminal


def test_tables_cover_every_status() -> None:
    assert set(SAGA_TRANSITIONS) == set(SagaStatus)
    assert set(STEP_TRANSITIONS) == set(StepStatus)


def test_saga_transition_table_is_exactly_the_legal_moves() -> None:
    table = {(src, dst) for src, dsts in SAGA_TRANSITIONS.items() for dst in dsts}
    assert table == LEGAL_SAGA_MOVES


def test_step_transition_table_is_exactly_the_legal_moves() -> None:
    table = {(src, dst) for src, dsts in STEP_TRANSITIONS.items() for dst in dsts}
    assert table == LEGAL_STEP_MOVES


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(SagaStatus, SagaStatus)))
def test_saga_can_move(src: SagaStatus, dst: SagaStatus) -> None:
    assert saga_can_move(src, dst) is ((src, dst) in LEGAL_SAGA_MOVES)


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(StepStatus, StepStatus)))
def test_step_can_move(src: StepStatus, dst: StepStatus) -> None:
    assert step_can_move(src, dst) is ((src, dst) in LEGAL_STEP_MOVES)


@pytest.mark.parametrize("status", [S.COMPLETED, S.COMPENSATED])
def test_finished_sagas_never_move(status: SagaStatus) -> None:
    assert SAGA_TRANSITIONS[status] == frozenset()
    assert not any(saga_can_move(status, dst) for dst in SagaStatus)


def test_nothing_goes_back_to_pending_and_compensated_is_final() -> None:
    assert not any(step_can_move(src, T.PENDING) for src in StepStatus)
    assert not any(saga_can_move(src, S.RUNNING) for src in SagaStatus if src is not S.FAILED)
    assert STEP_TRANSITIONS[T.COMPENSATED] == frozenset()


def test_a_compensated_saga_was_compensating_first() -> None:
    assert [src for src in SagaStatus if saga_can_move(src, S.COMPENSATED)] == [S.COMPENSATING]
    assert [src for src in SagaStatus if saga_can_move(src, S.COMPLETED)] == [S.RUNNING]
