"""Driving one claimed saga: plan → (start → call →) decide → commit, until it is idle.

Every decision is the core's (`app.core.decide`) and every write a `Commit` the
repository applies. What this module adds is the I/O between them: starting the attempt
through the service's gate, building and sending the request, and carrying each Commit
to the repository, deciding again when a guard says the world moved (a cancel came
first, the service or its breaker changed, the bulkhead was full).
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

from app.core.breaker import Breaker, Passage, after_call, gate, recheck_after
from app.core.callbacks import CALLBACK_URL_HEADER, TOKEN_BYTES, no_report, reported, token_hash
from app.core.commit import BreakerChange, Commit, Next, SagaState, apply, started
from app.core.decide import (
    Attempt,
    Await,
    BeginCompensation,
    Call,
    Finish,
    GiveUp,
    begin_compensation,
    cut_off,
    decide,
    finish,
    give_up,
    next_action,
    wait,
)
from app.core.definition import DefinitionSpec
from app.core.outcome import CallFailure, CallResult, Outcome, classify
from app.core.requests import HttpRequest, build_request
from app.core.states import Direction, SagaStatus, StepStatus, WaitReason
from app.core.templates import RenderContext, TemplateError
from app.core.views import FirstAttempt
from app.core.waits import WaitEnd, accepted, accepts, end_wait, keep_waiting, wait_over
from app.engine.failpoints import Failpoints
from app.engine.ports import (
    Applied,
    CancelFirst,
    Claimed,
    Lease,
    Refusal,
    Refused,
    SagaRepository,
    ServiceView,
    StartAttempt,
)
from app.engine.services import ServiceCache
from app.logs import known_secrets

GUARD_ROUNDS = 4  # a guard that keeps moving is odd; past this many rounds the saga waits


class LeaseLost(Exception):
    """Another worker took this saga over; this one must not write."""


@dataclass
class Prestarted:
    """The next attempt, started in the commit of the previous outcome (one transaction
    for both): what the call needs once the next plan confirms it."""

    action: Call
    start: StartAttempt
    view: ServiceView | None
    breaker: Breaker | None
    token: str | None
    attempt: int | None = None  # set when the commit started it


@dataclass
class SagaRun:
    """One claimed saga, as its executor holds it between commits."""

    claimed: Claimed
    spec: DefinitionSpec
    state: SagaState
    db_now: datetime
    prestarted: Prestarted | None = None

    @property
    def lease(self) -> Lease:
        return self.claimed.lease


class Host(Protocol):
    """What a Driver needs from its executor."""

    repo: SagaRepository
    services: ServiceCache
    failpoints: Failpoints
    lease_seconds: float
    callback_url: str  # where participants report: this + the token

    async def send(
        self,
        run: SagaRun,
        step: str,
        direction: Direction,
        attempt: int,
        request: HttpRequest,
        send_by: float,
    ) -> CallResult: ...

    def observed(
        self,
        run: SagaRun,
        step: str,
        direction: Direction,
        attempt: int,
        result: CallResult,
        outcome: Outcome,
        commit: Commit,
        duration_ms: float,
        service: str | None,
    ) -> None: ...

    def finished(self, run: SagaRun, status: SagaStatus) -> None: ...

    def notification_armed(self, run: SagaRun, epoch: int) -> None: ...

    def denied(self, run: SagaRun, reason: WaitReason) -> None: ...

    def wake_at(self, delay: float) -> None: ...


class Driver:
    def __init__(self, host: Host) -> None:
        self.host = host

    async def drive(self, run: SagaRun) -> None:
        """Work on the saga until it needs nothing from this worker now."""
        abandoned = cut_off(run.spec, run.state)
        if abandoned is not None and not await self._reported_meanwhile(run, abandoned):
            await self.commit(run, abandoned)
        while await self.advance(run):
            pass

    async def _reported_meanwhile(self, run: SagaRun, abandoned: Commit) -> bool:
        """A callback attempt cut off by a crash: its wait is closed, unless its report
        came first; then the report is the attempt's outcome (True), not the cut-off."""
        step = abandoned.step
        assert step is not None
        if run.spec.steps[step.index].callback is None or step.status is not StepStatus.RUNNING:
            return False
        number = run.state.steps[step.index].attempts
        token = await self.host.repo.close_callback(run.lease, step.index, number)
        if token is None or token.report is None:
            return False
        attempt = Attempt(Call(step.index, Direction.ACTION), number, reported(token.report), 0.0)
        await self._decide_and_apply(run, attempt)
        return True

    async def advance(self, run: SagaRun) -> bool:
        """Do the next thing; True while there is more to do at once."""
        action = next_action(run.spec, run.state, run.db_now)
        pre = run.prestarted
        if pre is not None and pre.attempt is not None and action != pre.action:
            # Not expected (the commit checked what the plan checks), but never leave an
            # attempt recorded as in flight that is not made: close it as cut off.
            run.prestarted = None
            run.state = started(run.state, pre.action.index, pre.action.direction, pre.attempt)
            abandoned = cut_off(run.spec, run.state)
            assert abandoned is not None
            return await self.commit(run, abandoned) is Next.CONTINUE
        if action is None:
            # Nothing to do (a terminal saga, or one whose work an operator finished): it
            # is not due any more, so no executor claims it again.
            if not await self.host.repo.idle(run.lease):
                raise LeaseLost
            return False
        if isinstance(action, Finish):
            commit = finish(run.state, action)
        elif isinstance(action, BeginCompensation):
            commit = begin_compensation(run.state, action)
        elif isinstance(action, GiveUp):
            commit = give_up(run.spec, run.state, action, run.db_now)
        elif isinstance(action, Await):
            return await self.await_report(run, action)
        else:
            return await self.call(run, action)
        return await self.commit(run, commit) is Next.CONTINUE

    async def commit(self, run: SagaRun, commit: Commit) -> Next:
        """Carry a Commit to the repository; a completion that yielded to a cancel comes
        back as CONTINUE (the next plan unwinds)."""
        return commit.saga.next if await self._apply(run, commit) else Next.CONTINUE

    async def _apply(self, run: SagaRun, commit: Commit, then: Prestarted | None = None) -> bool:
        """True when the commit landed; False when it yielded to a cancel (then the state
        knows of the cancel and nothing was written). With `then`, the next attempt may
        start in the same statement (`run.prestarted`)."""
        was = run.state.status
        result = await self.host.repo.commit(
            run.lease, commit, was, then.start if then is not None else None
        )
        if result is None:
            raise LeaseLost
        run.db_now = result.db_now
        if isinstance(result, CancelFirst):
            run.state = replace(run.state, cancel_requested=True)
            return False
        run.state = replace(apply(run.state, commit), cancel_requested=result.cancel_requested)
        if then is not None and result.next_attempt is not None:
            then.attempt = result.next_attempt
            run.prestarted = then
        if commit.saga.status.terminal and commit.saga.status is not was:
            self.host.finished(run, commit.saga.status)
        if result.notification is not None:
            self.host.notification_armed(run, result.notification)
        if commit.breaker is not None:
            await self._settle_breaker(commit.breaker, result)
        if commit.saga.next is Next.LATER:
            self.host.wake_at(commit.saga.delay_seconds)
        return True

    async def _settle_breaker(self, change: BreakerChange, result: Applied) -> None:
        """A breaker change that lost a race with another process: apply this call's
        effect again on the breaker as it is now (compare-and-set, a few rounds)."""
        services = self.host.services
        if not result.breaker_conflict:
            services.breaker_moved(change.service, change.after)
            return
        view = await services.refresh(change.service)
        failed = change.after.consecutive_failures > change.before.consecutive_failures
        for _ in range(GUARD_ROUNDS):
            if view is None:
                return
            after = after_call(view.spec.circuit_breaker, view.breaker, result.db_now, failed)
            if after == view.breaker:
                return
            now = await self.host.repo.apply_breaker(BreakerChange(view.name, view.breaker, after))
            if now is None:
                services.breaker_moved(view.name, after)
                return
            view = replace(view, breaker=now)

    # --- one attempt --------------------------------------------------------------------

    async def call(self, run: SagaRun, action: Call) -> bool:
        """Start the attempt through the service's gate, then make it."""
        pre, run.prestarted = run.prestarted, None
        if pre is not None and pre.attempt is not None and pre.action == action:
            return await self._attempt(run, action, pre.attempt, pre.view, pre.breaker, pre.token)
        step_spec = run.spec.steps[action.index]
        forward = action.direction is Direction.ACTION
        call_spec = step_spec.action if forward else step_spec.compensation
        assert call_spec is not None
        name = call_spec.service
        view = await self.host.services.get(name) if name else None
        # A callback step's attempt gets its own token; only its hash is stored.
        token = secrets.token_urlsafe(TOKEN_BYTES) if forward and step_spec.callback else None
        for _ in range(GUARD_ROUNDS):
            start = StartAttempt(
                action.index,
                action.direction,
                step_spec.name,
                pivot=forward and step_spec.pivot,
                callback_hash=token_hash(token) if token else None,
                callback_timeout=step_spec.callback.timeout_seconds
                if token and step_spec.callback
                else None,
            )
            breaker: Breaker | None = None
            if view is not None:
                decision = gate(view.spec.circuit_breaker, view.breaker, run.db_now)
                if decision.passage is not Passage.CALL and not self.host.services.fresh(view):
                    view = await self.host.services.refresh(view.name)  # never wait on a guess
                    continue
                if decision.passage is Passage.WAIT:
                    assert decision.retry_at is not None
                    return await self._wait(run, WaitReason.CIRCUIT_OPEN, view, decision.retry_at)
                breaker = decision.breaker
                start = replace(
                    start,
                    service=view.name,
                    version=view.version,
                    passage=decision.passage,
                    breaker=view.breaker,
                    breaker_after=decision.breaker,
                )
            outcome = await self.host.repo.start_attempt(run.lease, start)
            if outcome is None:
                raise LeaseLost
            run.db_now = outcome.db_now
            if not isinstance(outcome, Refused):
                return await self._attempt(run, action, outcome.attempt, view, breaker, token)
            if outcome.reason is Refusal.CANCELLED_FIRST:
                run.state = replace(run.state, cancel_requested=True)  # the next plan unwinds
                return True
            if outcome.reason is Refusal.STALE:
                view = self.host.services.put(name, outcome.service) if name else None
                continue
            assert view is not None
            reason = (
                WaitReason.BULKHEAD_FULL
                if outcome.reason is Refusal.NO_SLOT
                else WaitReason.HALF_OPEN_BUSY
            )
            return await self._wait_a_moment(run, reason, view)
        assert view is not None  # the guards kept moving: look again in a moment
        return await self._wait_a_moment(run, WaitReason.BULKHEAD_FULL, view)

    async def _wait_a_moment(self, run: SagaRun, reason: WaitReason, view: ServiceView) -> bool:
        """Turned away by a full bulkhead or a busy probe: look again shortly, jittered
        so that the sagas turned away together do not all come back together."""
        recheck = recheck_after(reason, view.spec.circuit_breaker)
        until = run.db_now + timedelta(seconds=recheck + random.uniform(0, recheck))
        return await self._wait(run, reason, view, until)

    async def _wait(
        self, run: SagaRun, reason: WaitReason, view: ServiceView, until: datetime
    ) -> bool:
        self.host.denied(run, reason)
        commit = wait(run.spec, run.state, reason, view.name, until, run.db_now)
        return await self.commit(run, commit) is Next.CONTINUE

    async def _attempt(
        self,
        run: SagaRun,
        action: Call,
        number: int,
        view: ServiceView | None,
        breaker: Breaker | None,
        token: str | None = None,
    ) -> bool:
        """The attempt is recorded as started: make the call, then commit its outcome."""
        run.state = started(run.state, action.index, action.direction, number)
        committed_at = time.monotonic()  # the lease runs from the commit (clock_timestamp)
        failpoints = self.host.failpoints
        if action.direction is Direction.COMPENSATION:
            failpoints.hit("mid_compensation")
        failpoints.hit("before_send")
        step_spec = run.spec.steps[action.index]
        forward = action.direction is Direction.ACTION
        call_spec = step_spec.action if forward else step_spec.compensation
        assert call_spec is not None
        began = time.monotonic()
        request: HttpRequest | None = None
        try:
            request = build_request(
                call=call_spec,
                service=view.spec if view else None,
                step_name=step_spec.name,
                step_timeout=step_spec.timeout_seconds,
                direction=action.direction,
                saga_id=run.lease.saga_id,
                context=_context(run, lenient=not forward),
                request_id=run.claimed.request_id,
                deadline_at=run.claimed.deadline_at,
            )
        except TemplateError as exc:
            result = CallResult(failure=CallFailure.TEMPLATE, message=str(exc))
        if request is not None:
            request.headers["X-Saga-Attempt"] = str(number)
            if token is not None:
                request.headers[CALLBACK_URL_HEADER] = self.host.callback_url + token
            # A process paused for half a lease since the start committed must not send:
            # another may own the saga by now.
            send_by = committed_at + self.host.lease_seconds / 2
            result = await self.host.send(
                run, step_spec.name, action.direction, number, request, send_by
            )
        duration_ms = (time.monotonic() - began) * 1000
        failpoints.hit("after_send_before_commit")
        # A participant may echo a secret (its API key) in an error body: never stored.
        result = replace(result, message=known_secrets.redact(result.message))
        counted = view is not None and result.failure is not CallFailure.TEMPLATE
        accepted = accepts(step_spec, action.direction, result)
        if token is not None and not accepted:
            # The call did not leave the step waiting: its token is closed, unless the
            # participant reported first; then its report is the outcome.
            state = await self.host.repo.close_callback(run.lease, action.index, number)
            if state is not None and state.report is not None:
                result = reported(state.report)
        attempt = Attempt(
            call=action,
            number=number,
            result=result,
            duration_ms=duration_ms,
            service=call_spec.service,
            breaker=breaker if counted else None,
            breaker_config=view.spec.circuit_breaker if view else None,
            request=request.redacted(
                (set(view.spec.headers) if view else set()) | {CALLBACK_URL_HEADER}
            )
            if request
            else None,
            accepted=accepted,
        )
        commit = await self._decide_and_apply(run, attempt)
        self._observed(run, attempt, commit, call_spec.service)
        failpoints.hit("after_commit")
        if accepted:
            failpoints.hit("while_waiting")
            # A report taken while this worker still held the saga could not make it due.
            if await self.host.repo.wake_if_reported(run.lease, action.index, number):
                self.host.wake_at(0.0)
        return commit.saga.next is Next.CONTINUE

    def _next_start(self, run: SagaRun, commit: Commit) -> Prestarted | None:
        """The attempt that follows `commit` at once, when it can start in the same
        statement: another step's call (see `_prestart`)."""
        if commit.saga.next is not Next.CONTINUE or commit.saga.status.terminal:
            return None
        follow = next_action(run.spec, apply(run.state, commit), run.db_now)
        if not isinstance(follow, Call) or (commit.step and commit.step.index == follow.index):
            return None
        return self._prestart(run.spec, follow, run.db_now)

    def first_attempt(self, spec: DefinitionSpec) -> FirstAttempt | None:
        """The first step's first attempt, to start in the statement that creates the
        saga (see `_prestart`; not a callback step: its token is made with its start)."""
        if spec.steps[0].callback is not None:
            return None
        pre = self._prestart(spec, Call(0, Direction.ACTION), datetime.now(UTC))
        if pre is None:
            return None
        return FirstAttempt(pre.start.step_name, pre.start.service, pre.start.version, pre)

    def _prestart(self, spec: DefinitionSpec, follow: Call, now: datetime) -> Prestarted | None:
        """`follow`, when it can start in the statement that writes what comes before it:
        not the pivot, and for a service one whose breaker this process last saw closed
        (the statement checks it is still so, at the same version, with a free slot)."""
        step_spec = spec.steps[follow.index]
        forward = follow.direction is Direction.ACTION
        call_spec = step_spec.action if forward else step_spec.compensation
        if call_spec is None or (forward and step_spec.pivot):
            return None
        view, breaker = None, None
        if call_spec.service is not None:
            view = self.host.services.peek(call_spec.service)
            if view is None:
                return None
            decision = gate(view.spec.circuit_breaker, view.breaker, now)
            if decision.passage is not Passage.CALL:
                return None
            breaker = decision.breaker
        token = secrets.token_urlsafe(TOKEN_BYTES) if forward and step_spec.callback else None
        start = StartAttempt(
            follow.index,
            follow.direction,
            step_spec.name,
            service=view.name if view else None,
            version=view.version if view else None,
            passage=Passage.CALL if view else None,
            breaker=view.breaker if view else None,
            breaker_after=breaker,
            callback_hash=token_hash(token) if token else None,
            callback_timeout=step_spec.callback.timeout_seconds
            if token and step_spec.callback
            else None,
        )
        return Prestarted(follow, start, view, breaker, token)

    async def _decide_and_apply(self, run: SagaRun, attempt: Attempt) -> Commit:
        if attempt.accepted:  # the step waits for its report: nothing to yield to yet
            commit = accepted(run.spec, run.state, attempt, run.db_now)
            if not await self._apply(run, commit):
                raise AssertionError("a wait does not complete the saga")
            return commit
        commit = decide(run.spec, run.state, attempt, run.db_now)
        if not await self._apply(run, commit, self._next_start(run, commit)):
            # The completion yielded to a cancel accepted during the call (or the wait):
            # decide again knowing of it (the step's success is kept; the saga unwinds).
            commit = decide(run.spec, run.state, attempt, run.db_now)
            if not await self._apply(run, commit):
                raise AssertionError("a decision that knows of the cancel cannot yield to it")
        return commit

    def _observed(
        self, run: SagaRun, attempt: Attempt, commit: Commit, service: str | None
    ) -> None:
        step_spec = run.spec.steps[attempt.call.index]
        forward = attempt.call.direction is Direction.ACTION
        policy = step_spec.retry if forward else step_spec.compensation_retry
        self.host.observed(
            run,
            step_spec.name,
            attempt.call.direction,
            attempt.number,
            attempt.result,
            classify(attempt.result, policy.retry_on_status),
            commit,
            attempt.duration_ms,
            service,
        )

    # --- a step waiting for its callback ----------------------------------------------

    async def await_report(self, run: SagaRun, action: Await) -> bool:
        """Look at the waiting step's token: decide on its report; or, once the wait is
        over (timeout, cancel, deadline), close it (unless a report wins that race) and
        decide on that; else keep waiting until it is over."""
        index = action.index
        number = run.state.steps[index].attempts
        step_spec = run.spec.steps[index]
        assert step_spec.callback is not None, "only a callback step waits"
        repo = self.host.repo
        token = await repo.callback(run.lease, index, number)
        if token is None:
            raise LookupError(f"step {step_spec.name} waits with no token for attempt {number}")
        run.db_now = token.db_now
        if token.report is None and not token.closed:
            if wait_over(run.spec, run.state, token.due_at, token.db_now) is None:
                commit = keep_waiting(run.spec, run.state, token.due_at, token.db_now)
                return await self.commit(run, commit) is Next.CONTINUE
            token = await repo.close_callback(run.lease, index, number)
            if token is None:
                raise LeaseLost
            run.db_now = token.db_now
        if token.report is not None:
            result = reported(token.report)
        else:
            why = wait_over(run.spec, run.state, token.due_at, token.db_now)
            if why in (WaitEnd.CANCELLED, WaitEnd.DEADLINE):
                assert why is not None
                return (
                    await self.commit(run, end_wait(run.spec, run.state, index, why))
                    is Next.CONTINUE
                )
            result = no_report(step_spec.callback.timeout_seconds)
        waited_ms = max(0.0, (token.db_now - token.started_at).total_seconds() * 1000)
        attempt = Attempt(Call(index, Direction.ACTION), number, result, waited_ms)
        commit = await self._decide_and_apply(run, attempt)
        self._observed(run, attempt, commit, step_spec.action.service)
        return commit.saga.next is Next.CONTINUE


def _context(run: SagaRun, lenient: bool = False) -> RenderContext:
    """What templates may see: the input, the saga id, earlier steps' results."""
    return RenderContext(
        input=run.claimed.input,
        saga_id=str(run.lease.saga_id),
        absent_results_as_null=lenient,
        step_results={
            s.name: (s.status_code, s.response)
            for s in run.state.steps
            if s.status in (StepStatus.SUCCEEDED, StepStatus.FALLBACK)
            or s.response is not None
            or s.status_code is not None
        },
    )
