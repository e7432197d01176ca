"""The engine's decisions, as pure functions of the definition, the saga's state, an
attempt's result and the time.

- `next_action`: what to do next for a saga (call a step, give up on a cut-off attempt,
  begin compensating, finish, or nothing).
- `decide`: what one attempt's result leads to, as one `Commit`: the step's and saga's
  new state, the events, a dead letter, the breaker change, and whether the worker goes
  straight on (the follow-up is planned here too, so a saga finishes in the commit of
  its last step's outcome).
- `begin_compensation`, `finish`, `give_up`, `wait`: the other decisions, as Commits too.

The executor carries these values out and the store applies them; the failure plan
(`GET /v1/definitions/{name}/plan`) runs the very same functions over synthetic results.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.breaker import Breaker, after_call, counts_as_failure
from app.core.commit import (
    BreakerChange,
    Commit,
    DeadLetter,
    Event,
    Next,
    PivotLock,
    SagaError,
    SagaState,
    SagaWrite,
    StepError,
    StepState,
    StepWrite,
    Waiting,
    apply,
)
from app.core.definition import CircuitBreakerConfig, DefinitionSpec, StepSpec
from app.core.outcome import CallResult, Outcome, classify
from app.core.retry import Draw, decide_retry
from app.core.states import (
    AttemptOutcome,
    Direction,
    ErrorKind,
    EventType,
    SagaStatus,
    StepStatus,
    WaitReason,
)

# Unexpected errors of the executor on one saga in a row before it is parked `failed`.
CRASH_LIMIT = 3
# Statuses a step can be in once forward work on it is over.
FORWARD_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.FALLBACK, StepStatus.FAILED})
_IN_PROGRESS = frozenset({StepStatus.RUNNING, StepStatus.COMPENSATING})


# --- what to do next ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """Make the next attempt of step `index` in `direction`."""

    index: int
    direction: Direction


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Step `index`'s last attempt in `direction` was cut off (its worker died or lost
    the lease) and its policy allows no more: judge it failed with an unknown outcome
    instead of making an attempt beyond the maximum."""

    index: int
    direction: Direction


@dataclass(frozen=True, slots=True)
class BeginCompensation:
    """Stop going forward and unwind, recording `error` on the saga."""

    error: SagaError


@dataclass(frozen=True, slots=True)
class Finish:
    """The saga reaches a terminal status."""

    status: SagaStatus


@dataclass(frozen=True, slots=True)
class Await:
    """Step `index` waits for its callback report: look at its token (a report taken, or
    the wait over: timed out, cancelled, past the deadline)."""

    index: int


Action = Call | GiveUp | BeginCompensation | Finish | Await | None


def pivot_passed(spec: DefinitionSpec, saga: SagaState) -> bool:
    """Has the pivot step succeeded? After that the saga can only go forward."""
    return any(
        step_spec.pivot and state.status is StepStatus.SUCCEEDED
        for step_spec, state in zip(spec.steps, saga.steps, strict=True)
    )


def needs_compensation(step_spec: StepSpec, state: StepState) -> bool:
    """Whether unwinding must run this step's compensation (again)."""
    if step_spec.compensation is None:
        return False
    if state.status in (StepStatus.SUCCEEDED, StepStatus.COMPENSATING):
        return True
    # The action may have happened although we never saw it succeed: an attempt whose
    # outcome is unknown, or one a crash cut off (still in flight).
    if state.status in (
        StepStatus.FAILED,
        StepStatus.FALLBACK,
        StepStatus.RUNNING,
        StepStatus.WAITING,
    ):
        return state.maybe_applied or state.in_flight
    return False


def next_action(spec: DefinitionSpec, saga: SagaState, now: datetime) -> Action:
    """The next thing to do for a saga its executor holds."""
    if not saga.status.terminal or saga.status is SagaStatus.COMPLETED:
        # A step waiting for its callback comes first: its wait must end (with the report,
        # or closed) before anything else, a cancel's unwinding included.
        for index, state in enumerate(saga.steps):
            if state.status is StepStatus.WAITING:
                return Await(index)
    if saga.status is SagaStatus.RUNNING:
        return _next_forward(spec, saga, now)
    if saga.status is SagaStatus.COMPENSATING:
        for index in range(len(saga.steps) - 1, -1, -1):
            state = saga.steps[index]
            if needs_compensation(spec.steps[index], state):
                limit = spec.steps[index].compensation_retry.max_attempts
                if state.status is StepStatus.COMPENSATING and state.compensation_attempts >= limit:
                    return GiveUp(index, Direction.COMPENSATION)
                return Call(index, Direction.COMPENSATION)
        return Finish(SagaStatus.COMPENSATED)
    if saga.status is SagaStatus.COMPLETED:
        # An operator retried a dead-lettered non-critical step of a completed saga.
        for index, state in enumerate(saga.steps):
            if state.status in (StepStatus.PENDING, StepStatus.RUNNING):
                return _forward(spec, index, state)
    return None


def _next_forward(spec: DefinitionSpec, saga: SagaState, now: datetime) -> Action:
    can_unwind = not pivot_passed(spec, saga)
    if can_unwind and saga.cancel_requested:
        return BeginCompensation(SagaError(None, ErrorKind.CANCELLED, "cancelled on request"))
    if can_unwind and saga.deadline_at is not None and now >= saga.deadline_at:
        current = next((s.name for s in saga.steps if s.status not in FORWARD_DONE), None)
        waiting = saga.waiting
        if waiting is not None and waiting.reason is not WaitReason.BULKHEAD_FULL:
            return BeginCompensation(
                SagaError(
                    current,
                    ErrorKind.CIRCUIT_OPEN,
                    f"deadline passed while waiting: {waiting.reason.value}:{waiting.service}",
                )
            )
        return BeginCompensation(
            SagaError(current, ErrorKind.DEADLINE, "the saga's timeout_seconds passed")
        )
    for index, state in enumerate(saga.steps):
        if state.status in (StepStatus.PENDING, StepStatus.RUNNING):
            return _forward(spec, index, state)
        if state.status not in FORWARD_DONE:
            raise ValueError(f"step {state.name} is {state.status} in a running saga")
    return Finish(SagaStatus.COMPLETED)


def _forward(spec: DefinitionSpec, index: int, state: StepState) -> Call | GiveUp:
    """The next forward attempt, unless the stored attempts already reach the maximum."""
    if (
        state.status is StepStatus.RUNNING
        and state.attempts >= spec.steps[index].retry.max_attempts
    ):
        return GiveUp(index, Direction.ACTION)
    return Call(index, Direction.ACTION)


# --- what an attempt's outcome leads to ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """The step's and saga's status after one attempt (the rules, before the Commit)."""

    step_status: StepStatus
    saga_status: SagaStatus
    retry_in: float | None = None  # seconds until the next attempt of the same call
    saga_error: SagaError | None = None
    dead_letter: bool = False
    use_fallback: bool = False
    continue_now: bool = False  # the saga has more work due immediately
    maybe_applied: bool = False


def after_attempt(
    spec: DefinitionSpec,
    saga: SagaState,
    call: Call,
    attempt: int,
    outcome: Outcome,
    retry_after: float | None = None,
    draw: Draw = random.uniform,
) -> Transition:
    """Decide the step's and saga's new status after attempt number `attempt` of `call`
    (`draw` picks a jittered delay in its bounds: at random, except in the failure plan)."""
    step_spec = spec.steps[call.index]
    state = saga.steps[call.index]
    maybe_applied = state.maybe_applied or outcome.maybe_applied
    if call.direction is Direction.COMPENSATION:
        return _after_compensation(step_spec, attempt, outcome, retry_after, maybe_applied, draw)

    # A completed saga only runs steps again on an operator's retry; it stays completed.
    goes_on = SagaStatus.COMPLETED if saga.status is SagaStatus.COMPLETED else SagaStatus.RUNNING
    if outcome.success:
        return Transition(StepStatus.SUCCEEDED, goes_on, continue_now=True, maybe_applied=True)
    decision = decide_retry(step_spec.retry, attempt, outcome.retryable, retry_after, draw)
    if decision.retry:
        return Transition(
            StepStatus.RUNNING,
            goes_on,
            retry_in=decision.delay_seconds,
            maybe_applied=maybe_applied,
        )
    error = SagaError(step_spec.name, outcome.error_kind or ErrorKind.HTTP_STATUS, outcome.message)
    if step_spec.fallback is not None:
        return Transition(
            StepStatus.FALLBACK,
            goes_on,
            use_fallback=True,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    if not step_spec.critical or saga.status is SagaStatus.COMPLETED:
        return Transition(
            StepStatus.FAILED,
            goes_on,
            dead_letter=True,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    if pivot_passed(spec, saga):
        # Past the point of no return: park it for an operator to push forward.
        return Transition(
            StepStatus.FAILED,
            SagaStatus.FAILED,
            saga_error=error,
            dead_letter=True,
            maybe_applied=maybe_applied,
        )
    return Transition(
        StepStatus.FAILED,
        SagaStatus.COMPENSATING,
        saga_error=error,
        continue_now=True,
        maybe_applied=maybe_applied,
    )


def _after_compensation(
    step_spec: StepSpec,
    attempt: int,
    outcome: Outcome,
    retry_after: float | None,
    maybe_applied: bool,
    draw: Draw,
) -> Transition:
    if outcome.success:
        return Transition(
            StepStatus.COMPENSATED,
            SagaStatus.COMPENSATING,
            continue_now=True,
            maybe_applied=maybe_applied,
        )
    policy = step_spec.compensation_retry
    decision = decide_retry(policy, attempt, outcome.retryable, retry_after, draw)
    if decision.retry:
        return Transition(
            StepStatus.COMPENSATING,
            SagaStatus.COMPENSATING,
            retry_in=decision.delay_seconds,
            maybe_applied=maybe_applied,
        )
    return Transition(
        StepStatus.COMPENSATION_FAILED,
        SagaStatus.FAILED,
        dead_letter=True,
        maybe_applied=maybe_applied,
    )


def cut_off_outcome(attempt: int) -> Outcome:
    """How an attempt that a crash cut off is judged: failed, outcome unknown."""
    return Outcome(
        success=False,
        retryable=False,
        maybe_applied=True,
        error_kind=ErrorKind.CONNECTION,
        message=f"attempt {attempt} was cut off (its worker stopped or lost its lease) "
        "and no attempts are left; outcome unknown",
    )


# --- the Commits -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt as the executor saw it, for `decide`."""

    call: Call
    number: int
    result: CallResult
    duration_ms: float
    service: str | None = None  # the service called (None: an absolute URL)
    breaker: Breaker | None = None  # its breaker as last seen, when its breaker applies
    breaker_config: CircuitBreakerConfig | None = None
    request: dict[str, Any] | None = None  # as a dead letter keeps it (secrets masked)
    accepted: bool = False  # a callback step's participant answered 202 (see `waits`)


def decide(
    spec: DefinitionSpec,
    saga: SagaState,
    attempt: Attempt,
    now: datetime,
    draw: Draw = random.uniform,
) -> Commit:
    """Everything one attempt's result leads to. `saga` is the state the attempt started
    from (its step in flight); `now` is the database's time of the attempt's end; `draw`
    picks a jittered retry delay in its bounds (the failure plan pins it to one end)."""
    call = attempt.call
    step_spec = spec.steps[call.index]
    forward = call.direction is Direction.ACTION
    policy = step_spec.retry if forward else step_spec.compensation_retry
    outcome = classify(attempt.result, policy.retry_on_status)
    breaker = breaker_change(attempt, outcome, now)
    transition = after_attempt(
        spec, saga, call, attempt.number, outcome, attempt.result.retry_after, draw
    )
    if transition.retry_in is not None:
        outcome_label = AttemptOutcome.RETRYABLE
    else:
        outcome_label = AttemptOutcome.SUCCEEDED if outcome.success else AttemptOutcome.FAILED
    events = [
        Event(
            EventType.ATTEMPT_FINISHED,
            step=step_spec.name,
            direction=call.direction,
            attempt=attempt.number,
            outcome=outcome_label,
            status_code=attempt.result.status_code,
            error_kind=outcome.error_kind,
            message=outcome.message or None,
            duration_ms=attempt.duration_ms,
        )
    ]
    return _commit_outcome(
        spec, saga, attempt, outcome, transition, events, now, breaker, release_slot=True
    )


def breaker_change(attempt: Attempt, outcome: Outcome, now: datetime) -> BreakerChange | None:
    """What the call does to its service's breaker (None: nothing, or no breaker)."""
    if attempt.breaker is None or attempt.breaker_config is None or not attempt.service:
        return None
    after = after_call(attempt.breaker_config, attempt.breaker, now, counts_as_failure(outcome))
    return (
        BreakerChange(attempt.service, attempt.breaker, after) if after != attempt.breaker else None
    )


def give_up(spec: DefinitionSpec, saga: SagaState, action: GiveUp, now: datetime) -> Commit:
    """The last allowed attempt was cut off: the step fails, outcome unknown, no call."""
    call = Call(action.index, action.direction)
    step = saga.steps[call.index]
    number = step.attempts if call.direction is Direction.ACTION else step.compensation_attempts
    outcome = cut_off_outcome(number)
    transition = after_attempt(spec, saga, call, number, outcome)
    event = Event(
        EventType.ATTEMPTS_EXHAUSTED,
        step=step.name,
        direction=call.direction,
        attempt=number,
        outcome=AttemptOutcome.FAILED,
        error_kind=outcome.error_kind,
        message=outcome.message,
    )
    attempt = Attempt(call, number, CallResult(message=outcome.message), 0.0)
    return _commit_outcome(spec, saga, attempt, outcome, transition, [event], now, None, False)


def _commit_outcome(
    spec: DefinitionSpec,
    saga: SagaState,
    attempt: Attempt,
    outcome: Outcome,
    transition: Transition,
    events: list[Event],
    now: datetime,
    breaker: BreakerChange | None,
    release_slot: bool,
) -> Commit:
    call = attempt.call
    step_spec = spec.steps[call.index]
    forward = call.direction is Direction.ACTION
    step = _step_write(step_spec, call, attempt, outcome, transition)
    if transition.use_fallback:
        events.append(Event(EventType.FALLBACK_USED, step=step_spec.name))
    if transition.saga_status is SagaStatus.COMPENSATING and saga.status is SagaStatus.RUNNING:
        err = transition.saga_error
        events.append(
            Event(
                EventType.COMPENSATION_STARTED,
                step=step_spec.name,
                error_kind=err.kind if err else None,
                message=err.message if err else None,
            )
        )
    pivot = PivotLock.KEEP
    if forward and step_spec.pivot:
        pivot = PivotLock.LOCK if step.status is StepStatus.SUCCEEDED else PivotLock.UNLOCK
    status, next_, delay = transition.saga_status, Next.IDLE, 0.0
    if transition.retry_in is not None:
        next_, delay = Next.LATER, transition.retry_in
        if saga.deadline_at is not None and forward:
            delay = max(0.0, min(delay, (saga.deadline_at - now).total_seconds()))
    elif transition.continue_now:
        after = apply(saga, Commit(SagaWrite(status, Next.IDLE), step))
        follow = next_action(spec, after, now)
        if isinstance(follow, Finish):
            status = follow.status
        elif follow is not None:
            next_ = Next.CONTINUE
    if status.terminal and status is not saga.status:
        events.append(Event(EventType.finished(status)))
    dead_letter = None
    if transition.dead_letter:
        target = step_spec.action if forward else step_spec.compensation or step_spec.action
        dead_letter = DeadLetter(
            step_index=call.index,
            step_name=step_spec.name,
            direction=call.direction,
            service=target.service,
            attempts=attempt.number,
            last_error=step.last_error.as_json() if step.last_error else None,
            request=attempt.request,
        )
    write = SagaWrite(
        status,
        next_,
        delay_seconds=delay,
        error=transition.saga_error,
        pivot=pivot,
        unless_cancelled=status is SagaStatus.COMPLETED and saga.status is SagaStatus.RUNNING,
    )
    return Commit(
        write,
        step,
        tuple(events),
        dead_letter,
        breaker,
        release_slot=release_slot,
    )


def _step_write(
    step_spec: StepSpec, call: Call, attempt: Attempt, outcome: Outcome, transition: Transition
) -> StepWrite:
    forward = call.direction is Direction.ACTION
    error = None
    if not outcome.success:
        error = StepError(
            outcome.error_kind,
            outcome.message,
            attempt.result.status_code,
            attempt.number,
            call.direction,
        )
    response: Any = None
    if outcome.success:
        response = attempt.result.body
    elif transition.use_fallback and step_spec.fallback is not None:
        response = step_spec.fallback.response
    return StepWrite(
        index=call.index,
        status=transition.step_status,
        maybe_applied=transition.maybe_applied,
        finished=transition.step_status not in _IN_PROGRESS,
        set_result=forward,
        status_code=attempt.result.status_code,
        response=response,
        last_error=error,
        keep_error=outcome.success and not forward,
    )


def begin_compensation(saga: SagaState, action: BeginCompensation) -> Commit:
    """Stop going forward: the saga compensates, with `error` recorded."""
    err = action.error
    event = Event(
        EventType.COMPENSATION_STARTED, step=err.step, error_kind=err.kind, message=err.message
    )
    return Commit(SagaWrite(SagaStatus.COMPENSATING, Next.CONTINUE, error=err), events=(event,))


def finish(saga: SagaState, action: Finish) -> Commit:
    """The saga reaches a terminal status (a completion yields to a live cancel)."""
    events = (Event(EventType.finished(action.status)),) if action.status is not saga.status else ()
    unless = action.status is SagaStatus.COMPLETED and saga.status is SagaStatus.RUNNING
    return Commit(SagaWrite(action.status, Next.IDLE, unless_cancelled=unless), events=events)


def wait(
    spec: DefinitionSpec,
    saga: SagaState,
    reason: WaitReason,
    service: str,
    until: datetime,
    now: datetime,
) -> Commit:
    """A breaker or a bulkhead turns the call away: no attempt is spent; the saga is due
    again at `until`, but no later than its deadline while it can still unwind (so the
    deadline is noticed on time)."""
    unwindable = saga.status is SagaStatus.RUNNING and not pivot_passed(spec, saga)
    if saga.deadline_at is not None and unwindable:
        until = min(until, saga.deadline_at)
    delay = max(0.0, (until - now).total_seconds())
    return Commit(
        SagaWrite(saga.status, Next.LATER, delay_seconds=delay, waiting=Waiting(reason, service)),
        crashes_reset=False,
    )


def cut_off(spec: DefinitionSpec, saga: SagaState) -> Commit | None:
    """A claimed saga with an attempt that a crash (or a lost lease) cut off: record that
    attempt as abandoned, its outcome unknown (for an action: possibly applied)."""
    for index, step in enumerate(saga.steps):
        if not step.in_flight:
            continue
        forward = step.status is StepStatus.RUNNING
        direction = Direction.ACTION if forward else Direction.COMPENSATION
        number = step.attempts if forward else step.compensation_attempts
        event = Event(
            EventType.ATTEMPT_FINISHED,
            step=step.name,
            direction=direction,
            attempt=number,
            outcome=AttemptOutcome.ABANDONED,
            message="the worker died or lost its lease during this attempt; outcome unknown",
        )
        write = StepWrite(
            index=index,
            status=step.status,
            maybe_applied=step.maybe_applied or forward,
            finished=False,
            keep_error=True,
        )
        # Not progress: a saga that keeps failing the executor still counts its errors.
        return Commit(SagaWrite(saga.status, Next.CONTINUE), write, (event,), crashes_reset=False)
    return None


def park_point(spec: DefinitionSpec | None, saga: SagaState) -> tuple[int, Direction]:
    """The step a saga that keeps failing the executor is parked at: the one it was on."""
    if saga.status is SagaStatus.COMPENSATING:
        for index in range(len(saga.steps) - 1, -1, -1):
            if spec is None or needs_compensation(spec.steps[index], saga.steps[index]):
                return index, Direction.COMPENSATION
        return len(saga.steps) - 1, Direction.COMPENSATION
    for index, step in enumerate(saga.steps):
        if step.status not in FORWARD_DONE:
            return index, Direction.ACTION
    return len(saga.steps) - 1, Direction.ACTION
