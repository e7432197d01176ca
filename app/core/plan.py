"""The failure plan: what happens when each step of a definition fails, in each way.

For every step and failure kind a saga is run in memory through the engine's own
decisions, in the loop `app.engine.driver` runs: `next_action` says what comes next,
`started` records the attempt, `decide` turns its result into a `Commit`, `apply` gives
the state after it; `begin_compensation`, `finish` and, for an open circuit, `gate` and
`wait` as at run time. Only the I/O is replaced: the step under test fails the same way
on every attempt, every other call (and every compensation) succeeds at once, and the
clock moves by the delays the decisions ask for (and by a timed-out attempt's timeout).

Jitter is the one choice the decisions leave to chance. Each case is run with the draw
pinned to the longest delays (`retry.latest`), which the plan reports, and, when some
delay was drawn from a range, again with the shortest (`retry.earliest`): the two runs
give the window's bounds, and a note says when the shortest delays change the outcome
(a deadline that long delays reach and short ones do not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from app.core.breaker import Breaker, Passage, gate
from app.core.commit import Commit, Next, SagaState, StepState, apply, started
from app.core.decide import (
    Attempt,
    BeginCompensation,
    Call,
    Finish,
    GiveUp,
    begin_compensation,
    decide,
    finish,
    give_up,
    next_action,
    wait,
)
from app.core.definition import CircuitBreakerConfig, DefinitionSpec, ServiceSpec, StepSpec
from app.core.outcome import CallFailure, CallResult
from app.core.requests import attempt_timeout
from app.core.retry import Draw, earliest, latest
from app.core.states import CircuitState, Direction, ErrorKind, SagaStatus, StepStatus, WaitReason

# A simulated saga makes at most 1000 attempts per call and settles in far fewer rounds;
# reaching this many is a bug, not a slow plan.
MAX_ROUNDS = 250_000
_T0 = datetime(2000, 1, 1, tzinfo=UTC)
_OK = CallResult(status_code=200)


class FailureKind(StrEnum):
    """How the step under test fails, on every attempt."""

    HTTP_4XX = "http_4xx"  # a status not in retry_on_status (the first 4xx that is not)
    HTTP_5XX = "http_5xx"  # a retried status (the first 5xx of retry_on_status, else 500)
    TIMEOUT = "timeout"  # no answer within the attempt's timeout
    CONNECTION = "connection"  # the connection is refused: nothing was sent
    CIRCUIT_OPEN = "circuit_open"  # the service's circuit is open and stays open
    DEADLINE = "deadline"  # the saga's deadline passes during the step's first attempt


class Then(StrEnum):
    """What follows the step's failure."""

    COMPENSATE = "compensate"  # the saga unwinds
    CONTINUE = "continue"  # non-critical: recorded, dead-lettered, the saga goes on
    FALLBACK = "fallback"  # the fallback response stands in, the saga goes on
    DEAD_LETTER = "dead_letter"  # past the pivot: the saga is parked failed for an operator
    WAIT = "wait"  # the circuit is open and no deadline ends the wait


@dataclass(frozen=True, slots=True)
class Failure:
    """What one failure kind of one step leads to."""

    attempts: int
    retry_window_seconds: tuple[float, float]
    then: Then
    compensates: tuple[str, ...]  # in the order they run; `name?`: its outcome is unknown
    final_status: SagaStatus  # `running` while it waits
    error_kind: ErrorKind | None  # the saga's error, when it unwinds or is parked
    note: str | None = None


@dataclass(frozen=True, slots=True)
class StepPlan:
    name: str
    failures: Mapping[FailureKind, Failure | None]  # None: that kind cannot happen here


@dataclass(frozen=True, slots=True)
class _Run:
    attempts: int
    window: float  # the retry delays between the step's first and last attempt
    then: Then
    compensates: tuple[str, ...]
    final_status: SagaStatus
    error_kind: ErrorKind | None
    drew: bool  # some delay was drawn from a range (jitter)

    def outcome(self) -> tuple[object, ...]:
        return self.attempts, self.then, self.compensates, self.final_status, self.error_kind


@dataclass(frozen=True, slots=True)
class _Tail:
    """How a saga ends once the step under test is done with. Every call left succeeds
    at once, so this depends only on the state and on whether the deadline has passed:
    the plan works it out once per such pair (a definition's many cases share few)."""

    status: SagaStatus
    compensated: tuple[str, ...]
    error_kind: ErrorKind | None  # set on the way (None: the saga's error stays)


_Tails = dict[tuple[str, bool], _Tail]


def _tail_key(state: SagaState, past_deadline: bool) -> tuple[str, bool]:
    """States hold JSON responses (a fallback's), so they are keyed by their text."""
    return repr(state), past_deadline


@dataclass
class _Simulation:
    """One saga in memory in which step `index` fails as `kind` on every attempt."""

    spec: DefinitionSpec
    services: Mapping[str, ServiceSpec]
    index: int
    kind: FailureKind
    draw: Draw
    state: SagaState
    tails: _Tails
    now: datetime = _T0
    window: float = 0.0
    delay: float = 0.0  # the retry delay before the step's next attempt, if one comes
    then: Then | None = None
    error_kind: ErrorKind | None = None
    compensated: list[str] = field(default_factory=list)
    drew: bool = False
    in_tail: bool = False
    tail_error: ErrorKind | None = None

    def run(self) -> _Run:
        tail: tuple[str, bool] | None = None
        for _ in range(MAX_ROUNDS):
            if self.then is not None and tail is None:
                tail = _tail_key(self.state, self._past_deadline())
                if tail in self.tails:
                    return self._ended(self.tails[tail])
                self.in_tail, tail_from = True, len(self.compensated)
            if not self._advance():
                break
        else:
            raise AssertionError(f"the simulated saga did not settle in {MAX_ROUNDS} rounds")
        if tail is not None:
            ended = _Tail(self.state.status, tuple(self.compensated[tail_from:]), self.tail_error)
            self.tails[tail] = ended
            return self._ended(ended, already=True)
        return self._ended(None)

    def _advance(self) -> bool:
        """Do the next thing, as the driver does; False once the saga needs nothing more."""
        action = next_action(self.spec, self.state, self.now)
        if action is None:
            return False
        if isinstance(action, Call):
            commit = self._call(action)
            if commit is None:  # waiting again on the open circuit changes nothing
                deadline = self.state.deadline_at
                if deadline is None or self.now >= deadline:
                    self.then = Then.WAIT  # and nothing ever will: it waits for good
                    return False
                self.now = deadline  # every wait until the deadline is the same
                return True
        elif isinstance(action, Finish):
            commit = finish(self.state, action)
        elif isinstance(action, BeginCompensation):
            commit = begin_compensation(self.state, action)
            self.then = self.then or Then.COMPENSATE
        elif isinstance(action, GiveUp):  # no attempt is ever cut off here
            commit = give_up(self.spec, self.state, action, self.now)
        else:  # a callback's report is simulated as the attempt's answer: nothing waits
            raise AssertionError(f"the simulated saga waits for a callback: {action}")
        self._commit(commit)
        return not self.state.status.terminal

    def _ended(self, tail: _Tail | None, already: bool = False) -> _Run:
        status, compensated, error = self.state.status, tuple(self.compensated), self.error_kind
        if tail is not None:
            status = tail.status
            compensated = compensated if already else compensated + tail.compensated
            error = tail.error_kind or error
        assert self.then is not None, "the step under test never failed"
        return _Run(
            attempts=self.state.steps[self.index].attempts,
            window=round(self.window, 6),
            then=self.then,
            compensates=compensated,
            final_status=status,
            error_kind=error,
            drew=self.drew,
        )

    def _past_deadline(self) -> bool:
        deadline = self.state.deadline_at
        return deadline is not None and self.now >= deadline

    def _commit(self, commit: Commit) -> None:
        self.state = apply(self.state, commit)
        if commit.saga.error is not None:
            self.error_kind = commit.saga.error.kind
            if self.in_tail:
                self.tail_error = commit.saga.error.kind
        if commit.saga.next is Next.LATER:
            self.now += timedelta(seconds=commit.saga.delay_seconds)

    def _call(self, call: Call) -> Commit | None:
        step = self.spec.steps[call.index]
        forward = call.direction is Direction.ACTION
        under_test = forward and call.index == self.index
        target = step.action if forward else step.compensation
        assert target is not None
        if under_test and self.kind is FailureKind.CIRCUIT_OPEN:
            assert target.service is not None
            return self._turned_away(target.service)
        before = self.state.steps[call.index]
        if not forward and before.compensation_attempts == 0:
            unknown = before.status is not StepStatus.SUCCEEDED
            self.compensated.append(step.name + ("?" if unknown else ""))
        number = (before.attempts if forward else before.compensation_attempts) + 1
        if under_test:
            self.window, self.delay = self.window + self.delay, 0.0
        self.state = started(self.state, call.index, call.direction, number)
        result, seconds = self._result(step) if under_test else (_OK, 0.0)
        end = self.now + timedelta(seconds=seconds)
        attempt = Attempt(call, number, result, seconds * 1000, service=target.service)
        commit = decide(self.spec, self.state, attempt, end, self._draw)
        self.now = end
        if under_test:
            self._judge(commit)
        return commit

    def _draw(self, low: float, high: float) -> float:
        self.drew = True
        return self.draw(low, high)

    def _judge(self, commit: Commit) -> None:
        """What the step under test's attempt led to: a retry, or the end of its work."""
        if commit.saga.next is Next.LATER and commit.step is not None and not commit.step.finished:
            self.delay = commit.saga.delay_seconds  # counted once that attempt starts
            return
        if commit.step is None or not commit.step.finished or self.then is not None:
            return
        if commit.step.status is StepStatus.FALLBACK:
            self.then = Then.FALLBACK
        elif commit.dead_letter is None:
            self.then = Then.COMPENSATE
        elif commit.saga.status is SagaStatus.FAILED:
            self.then = Then.DEAD_LETTER
        else:
            self.then = Then.CONTINUE

    def _result(self, step: StepSpec) -> tuple[CallResult, float]:
        """The failing attempt's result, and how long it took."""
        policy = step.retry
        timeout = attempt_timeout(step.timeout_seconds, self._service(step.action.service))
        if self.kind is FailureKind.HTTP_4XX:
            code = next((c for c in range(400, 500) if c not in policy.retry_on_status), 400)
            return CallResult(status_code=code), 0.0
        if self.kind is FailureKind.HTTP_5XX:
            code = next((c for c in policy.retry_on_status if c >= 500), 500)
            return CallResult(status_code=code), 0.0
        if self.kind is FailureKind.CONNECTION:
            return CallResult(failure=CallFailure.CONNECT, message="connection refused"), 0.0
        timed_out = CallResult(failure=CallFailure.TIMEOUT, message=f"no answer in {timeout}s")
        deadline = self.state.deadline_at
        if self.kind is FailureKind.DEADLINE and deadline is not None and deadline > self.now:
            return timed_out, (deadline - self.now).total_seconds()
        return timed_out, timeout

    def _turned_away(self, service: str) -> Commit | None:
        """The breaker turns the call away (`gate`), and the saga waits (`wait`); None
        when waiting again would change nothing (the saga already waits on it)."""
        config = self._breaker(service)
        breaker = Breaker(CircuitState.OPEN, config.failure_threshold, self.now)
        decision = gate(config, breaker, self.now)
        # A recovery timeout under the clock's resolution (a microsecond) is over at once.
        retry_at = decision.retry_at if decision.passage is Passage.WAIT else None
        commit = wait(
            self.spec, self.state, WaitReason.CIRCUIT_OPEN, service, retry_at or self.now, self.now
        )
        return None if apply(self.state, commit) == self.state else commit

    def _service(self, name: str | None) -> ServiceSpec | None:
        return self.services.get(name) if name else None

    def _breaker(self, name: str) -> CircuitBreakerConfig:
        service = self.services.get(name)
        return service.circuit_breaker if service else CircuitBreakerConfig()


def _lead_ins(spec: DefinitionSpec) -> list[SagaState | None]:
    """The saga just before each step's first call, every step before it succeeded: the
    happy path, run once by the same loop (each case of step i starts from its i-th).
    None for the steps it never reaches (a deadline that passes at once: under 1 µs)."""
    timeout = spec.timeout_seconds
    state = SagaState(
        SagaStatus.RUNNING,
        tuple(StepState(s.name, StepStatus.PENDING) for s in spec.steps),
        deadline_at=_T0 + timedelta(seconds=timeout) if timeout else None,
    )
    happy = _Simulation(spec, {}, -1, FailureKind.HTTP_4XX, latest, state, {})
    lead_ins: list[SagaState | None] = []
    while True:
        action = next_action(spec, happy.state, happy.now)
        if isinstance(action, Call) and action.index == len(lead_ins):
            lead_ins.append(happy.state)
        if not happy._advance():
            break
    assert happy.now == _T0
    return lead_ins + [None] * (len(spec.steps) - len(lead_ins))


def _applies(spec: DefinitionSpec, step: StepSpec, kind: FailureKind) -> bool:
    if kind is FailureKind.CIRCUIT_OPEN:
        return step.action.service is not None  # an absolute URL has no breaker
    if kind is FailureKind.DEADLINE:
        return spec.timeout_seconds is not None
    return True


def _plan_failure(
    spec: DefinitionSpec,
    index: int,
    kind: FailureKind,
    services: Mapping[str, ServiceSpec],
    lead_in: SagaState | None,
    tails: _Tails,
) -> Failure | None:
    if lead_in is None or not _applies(spec, spec.steps[index], kind):
        return None
    slow = _Simulation(spec, services, index, kind, latest, lead_in, tails).run()
    fast = slow
    if slow.drew:
        fast = _Simulation(spec, services, index, kind, earliest, lead_in, tails).run()
    note = None
    if fast.outcome() != slow.outcome():
        note = (
            f"with the longest retry delays; with shorter ones the step makes up to "
            f"{fast.attempts} attempts, then {fast.then.value}, and the saga ends "
            f"{fast.final_status.value}"
        )
    elif slow.error_kind is ErrorKind.DEADLINE and kind is not FailureKind.DEADLINE:
        note = "the saga's deadline passes before the retries are spent"
    return Failure(
        attempts=slow.attempts,
        retry_window_seconds=(fast.window, slow.window),
        then=slow.then,
        compensates=slow.compensates,
        final_status=slow.final_status,
        error_kind=slow.error_kind,
        note=note,
    )


def failure_plan(
    spec: DefinitionSpec, services: Mapping[str, ServiceSpec] | None = None
) -> tuple[StepPlan, ...]:
    """Every step and failure kind (None where a kind cannot happen: `circuit_open` for
    an absolute URL, `deadline` without the saga's `timeout_seconds`, any kind for a
    step the saga never reaches). `services` gives
    timeouts and breakers by name; a service it lacks is taken with the defaults (10 s
    timeout, a breaker of 5 failures and 30 s)."""
    known = services or {}
    tails: _Tails = {}
    return tuple(
        StepPlan(
            step.name,
            {kind: _plan_failure(spec, i, kind, known, lead_in, tails) for kind in FailureKind},
        )
        for (i, step), lead_in in zip(enumerate(spec.steps), _lead_ins(spec), strict=True)
    )
