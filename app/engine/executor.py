"""The step executor: claims due sagas and drives each one call at a time.

For every call: record the attempt as started (commit), call the participant while
renewing the lease, then commit the outcome together with the saga's new status and
the scheduling of what comes next (commit). A crash anywhere leaves the saga due
again once its lease expires; the participant may then see the same call again,
always with the same Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.domain.definition import DefinitionSpec, ServiceSpec
from app.domain.planner import (
    FORWARD_DONE,
    BeginCompensation,
    Call,
    Finish,
    GiveUp,
    SagaState,
    StepState,
    Transition,
    after_attempt,
    cut_off_outcome,
    needs_compensation,
    pivot_passed,
    plan,
)
from app.domain.states import AttemptOutcome, Direction, SagaStatus, StepStatus
from app.domain.templates import RenderContext, TemplateError
from app.engine.failpoints import Failpoints
from app.engine.requests import build_request
from app.logs import describe_error, known_secrets, safe_traceback
from app.participants.client import HttpRequest, ParticipantClient
from app.resilience.breaker import (
    BULKHEAD_RECHECK_SECONDS,
    Admission,
    Breaker,
    WaitReason,
    admit,
    after_call,
    counts_as_failure,
)
from app.resilience.outcome import CallFailure, CallResult, Outcome, classify
from app.settings import Settings
from app.store.executor import (
    CRASH_LIMIT,
    BreakerUpdate,
    CancelledFirst,
    DeadLetterRecord,
    Denied,
    EventRecord,
    ExecutorStore,
    Gate,
    Next,
    ParkRecord,
    PivotOutcome,
    SagaWork,
    SagaWrite,
    StepWrite,
)
from app.store.listen import Listener
from app.store.registry import Registry
from app.store.sagas import SAGA_WORK_CHANNEL
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing

log = logging.getLogger(__name__)
T = TypeVar("T")

_IN_PROGRESS = (StepStatus.RUNNING, StepStatus.COMPENSATING)
PRUNE_EVERY_SECONDS = 60.0


class LeaseLost(Exception):
    """Another worker took this saga over; this one must not write."""


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _db_retry() -> AsyncRetrying:
    """Short in-process retries for database hiccups on statements safe to repeat."""
    return AsyncRetrying(
        retry=retry_if_exception_type((OperationalError, DBAPIError)),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        stop=stop_after_attempt(5),
        reraise=True,
    )


@dataclass(frozen=True, slots=True)
class _CachedService:
    spec: ServiceSpec | None
    version: int


_ABSENT = _CachedService(None, 0)  # not registered (looked up again at every call)


class Executor:
    """Runs sagas until `stop` is set; any number of executors may share a database."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        url: str,
        worker_id: str | None = None,
        client: ParticipantClient | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()
        self.worker_id = worker_id or new_worker_id()
        self.store = ExecutorStore(engine, self.worker_id, settings.lease_seconds)
        self.registry = Registry(engine)
        self.url = url
        self.client = client or ParticipantClient(settings.host_policy)
        self._own_client = client is None
        self.failpoints = Failpoints(settings.failpoint)
        self._definitions: dict[int, DefinitionSpec] = {}
        self._services: dict[str, _CachedService] = {}
        self._tasks: dict[asyncio.Task[None], tuple[uuid.UUID, int]] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._calls_end: dict[uuid.UUID, float] = {}  # monotonic time each call times out

    # --- main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        listener = Listener(self.url, [SAGA_WORK_CHANNEL], lambda _c, _p: self._wake.set())
        listen_task = asyncio.create_task(listener.run(), name="executor-listen")
        prune_task = asyncio.create_task(self._prune_loop(), name="executor-prune")
        log.info("executor started", extra={"worker": self.worker_id})
        try:
            await self._claim_loop(stop)
        finally:
            listen_task.cancel()
            prune_task.cancel()
            await self._drain()
            if self._own_client:
                await self.client.aclose()
            log.info("executor stopped", extra={"worker": self.worker_id})

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        capacity = self.settings.worker_concurrency
        error_delay = 0.1
        while not stop.is_set():
            free = capacity - len(self._tasks)
            claimed: list[tuple[uuid.UUID, int]] = []
            if free > 0:
                self._wake.clear()
                try:
                    claimed = await self.store.claim(free)
                    error_delay = 0.1
                except (OperationalError, DBAPIError, OSError) as exc:
                    log.warning("claim failed", extra={"error": describe_error(exc)})
                    await _sleep_or_stop(stop, error_delay)
                    error_delay = min(error_delay * 2, 5.0)
                    continue
                self.failpoints.hit("while_claiming")
                for saga_id, epoch in claimed:
                    task = asyncio.create_task(self._run_saga(saga_id, epoch))
                    self._tasks[task] = (saga_id, epoch)
                    task.add_done_callback(self._task_done)
            if claimed and len(claimed) == free:
                continue  # probably more due work; claim again once a slot frees
            if free <= 0:
                self._slot_freed.clear()
                waits: list[Awaitable[Any]] = [self._slot_freed.wait(), stop.wait()]
            else:
                waits = [self._wake.wait(), stop.wait()]
            await _wait_any(waits, within=self.settings.poll_interval_seconds)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            log.error(
                "saga task crashed",
                extra={"error": describe_error(exc), "where": safe_traceback(exc)},
            )

    async def _drain(self) -> None:
        """Let in-flight sagas finish within the grace period, then hand the rest back."""
        if not self._tasks:
            return
        pending = dict(self._tasks)
        _done, still = await asyncio.wait(
            list(pending), timeout=self.settings.shutdown_grace_seconds
        )
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)
        now = time.monotonic()
        for task in still:
            saga_id, epoch = pending[task]
            call_ends = self._calls_end.pop(saga_id, now)
            try:
                await self.store.release(saga_id, epoch, max(0.0, call_ends - now))
            except Exception as exc:  # the lease expires on its own anyway
                log.warning(
                    "release failed",
                    extra={"saga_id": str(saga_id), "error": describe_error(exc)},
                )

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_SECONDS)
            try:
                await self.store.prune_idempotency_keys()
            except Exception as exc:
                log.warning("pruning idempotency keys failed", extra={"error": describe_error(exc)})

    # --- one saga ----------------------------------------------------------------------

    async def _run_saga(self, saga_id: uuid.UUID, epoch: int) -> None:
        work: SagaWork | None = None
        try:
            async for attempt in _db_retry():
                with attempt:
                    work = await self.store.load(saga_id, epoch)
            if work is None:
                return
            if any(s.status in _IN_PROGRESS for s in work.steps):
                # An attempt may have been cut off by a crash: record it as abandoned.
                await self.store.close_abandoned(work)
            spec = await self._definition(work.definition_id)
            while await self._advance(work, spec):
                pass
        except LeaseLost:
            log.info("lease lost", extra={"saga_id": str(saga_id), "worker": self.worker_id})
        except (OperationalError, InterfaceError, OSError) as exc:
            # The database is unreachable: the lease expires and another claim redoes the
            # unfinished attempt.
            log.warning(
                "database unavailable, saga left to lease expiry",
                extra={"saga_id": str(saga_id), "error_type": type(exc).__name__},
            )
        except Exception as exc:
            # Not a participant's doing (those are outcomes) nor an outage: a bug or data
            # the engine cannot handle. Never let the saga be claimed into it forever.
            await self._crashed(saga_id, work, exc)

    async def _crashed(self, saga_id: uuid.UUID, work: SagaWork | None, exc: Exception) -> None:
        log.error(
            "saga task failed",
            extra={
                "saga_id": str(saga_id),
                "error_type": type(exc).__name__,
                "where": safe_traceback(exc),
            },
        )
        if work is None:
            return
        try:
            spec = self._definitions.get(work.definition_id)
            crashes = await self.store.record_crash(
                work, type(exc).__name__, _park_record(work, spec)
            )
        except Exception as again:  # the lease expires; the count did not move
            log.error(
                "recording the failure failed",
                extra={"saga_id": str(saga_id), "error_type": type(again).__name__},
            )
            return
        if crashes >= CRASH_LIMIT:
            self.metrics.sagas_finished.labels(work.definition_name, "failed").inc()

    async def _advance(self, work: SagaWork, spec: DefinitionSpec) -> bool:
        """Do the next thing for a claimed saga; True while there is more to do now."""
        started = time.monotonic()
        nxt = plan(spec, _state(work), work.db_now)
        if nxt is None:
            # Nothing to do (a terminal saga, or one whose work an operator finished):
            # it is not due any more, so no executor claims it again.
            if not await self.store.idle(work):
                raise LeaseLost
            return False
        if isinstance(nxt, Finish):
            after = await self._commit(
                work, SagaWrite(nxt.status, Next.IDLE), events=_finish_events(nxt.status)
            )
            return after is Next.CONTINUE
        if isinstance(nxt, BeginCompensation):
            await self._commit(
                work,
                SagaWrite(SagaStatus.COMPENSATING, Next.CONTINUE, error=nxt.error.as_json()),
                events=(
                    EventRecord(
                        "compensation_started",
                        step=nxt.error.step,
                        error_kind=nxt.error.kind,
                        message=nxt.error.message,
                    ),
                ),
            )
            return True
        if isinstance(nxt, GiveUp):
            return await self._give_up(work, spec, nxt, started)
        return await self._call(work, spec, nxt, started)

    async def _give_up(
        self, work: SagaWork, spec: DefinitionSpec, give_up: GiveUp, started: float
    ) -> bool:
        """The last allowed attempt was cut off: record the step as failed, outcome unknown,
        without a call (an attempt beyond the policy's maximum is never made)."""
        call = Call(give_up.index, give_up.direction)
        row = work.steps[call.index]
        forward = call.direction is Direction.ACTION
        attempt = row.attempts if forward else row.compensation_attempts
        outcome = cut_off_outcome(attempt)
        transition = after_attempt(spec, _state(work), call, attempt, outcome)
        result = CallResult(failure=CallFailure.CONNECTION_LOST, message=outcome.message)
        return await self._record(
            work,
            spec,
            call,
            attempt,
            result,
            outcome,
            transition,
            None,
            None,
            started,
            None,
            cut_off=True,
        )

    async def _call(self, work: SagaWork, spec: DefinitionSpec, call: Call, started: float) -> bool:
        step_spec = spec.steps[call.index]
        row = work.steps[call.index]
        forward = call.direction is Direction.ACTION
        call_spec = step_spec.action if forward else step_spec.compensation
        assert call_spec is not None
        cached = await self._service(call_spec.service) if call_spec.service else None

        gate = None
        if cached is not None and cached.spec is not None and call_spec.service is not None:
            gate = self._gate(call_spec.service, cached, work, spec, forward)
        prior_maybe_applied = row.maybe_applied
        pivot = forward and step_spec.pivot
        attempt_started = await self.store.start_attempt(
            work, call.index, call.direction, row.name, gate, pivot=pivot
        )
        committed_at = time.monotonic()  # the lease runs from the commit (clock_timestamp)
        if attempt_started is None:
            raise LeaseLost
        if isinstance(attempt_started, CancelledFirst):
            work.cancel_requested = True  # the next plan unwinds instead
            return True
        if isinstance(attempt_started, Denied):
            # Breaker open or bulkhead full: no call, no attempt spent; the row is due later.
            self._wake_at(max(0.0, (attempt_started.retry_at - work.db_now).total_seconds()))
            return False
        attempt = attempt_started.attempt
        service = attempt_started.service
        if (
            call_spec.service is not None
            and service is not None
            and attempt_started.version is not None
        ):
            self._services[call_spec.service] = _CachedService(service, attempt_started.version)
        if forward:
            row.status, row.attempts, row.maybe_applied = StepStatus.RUNNING, attempt, True
        else:
            row.status, row.compensation_attempts = StepStatus.COMPENSATING, attempt
            self.failpoints.hit("mid_compensation")
        self.failpoints.hit("before_send")

        request: HttpRequest | None = None
        template_error: str | None = None
        try:
            request = build_request(
                call=call_spec,
                service=service,
                step_name=step_spec.name,
                step_timeout=step_spec.timeout_seconds,
                direction=call.direction,
                saga_id=work.id,
                context=_context(work, lenient=not forward),
                request_id=work.request_id,
                deadline_at=work.deadline_at,
            )
        except TemplateError as exc:
            template_error = str(exc)

        service_label = call_spec.service or "(url)"
        call_started = time.monotonic()
        if request is None:
            result = CallResult(failure=CallFailure.TEMPLATE, message=template_error or "")
        else:
            request.headers["X-Saga-Attempt"] = str(attempt)
            attributes: dict[str, str | int] = {
                "saga.id": str(work.id),
                "saga.step": step_spec.name,
                "saga.direction": call.direction.value,
                "saga.attempt": attempt,
            }
            self.metrics.local_in_flight.inc()
            try:
                with self.tracing.call_span(
                    work.traceparent, f"{step_spec.name} {call.direction.value}", attributes
                ) as trace_headers:
                    request.headers.update(trace_headers)
                    # A process paused for half a lease since start_attempt committed
                    # must not send: another may own the saga by now.
                    send_by = committed_at + self.settings.lease_seconds / 2
                    result = await self._with_lease(
                        work,
                        self.client.call(request, send_by=send_by),
                        request.timeout_seconds,
                    )
            finally:
                self.metrics.local_in_flight.dec()
        call_seconds = time.monotonic() - call_started
        self.failpoints.hit("after_send_before_commit")

        retry_policy = step_spec.retry if forward else step_spec.compensation_retry
        # A participant may echo a secret (its API key) in an error body: never stored.
        outcome = classify(result, retry_policy.retry_on_status)
        outcome = replace(outcome, message=known_secrets.redact(outcome.message))
        # The planner judges from the state before start_attempt's pessimistic mark.
        state = _state(work)
        state.steps[call.index].maybe_applied = prior_maybe_applied
        transition = after_attempt(spec, state, call, attempt, outcome, result.retry_after)
        if outcome.success:
            outcome_label = "succeeded"
        else:
            outcome_label = "retryable" if transition.retry_in is not None else "failed"
        self.metrics.attempts.labels(service_label, call.direction.value, outcome_label).inc()
        self.metrics.latency.labels(service_label, call.direction.value).observe(call_seconds)
        log.info(
            "attempt",
            extra={
                "saga_id": str(work.id),
                "request_id": work.request_id,
                "step": step_spec.name,
                "direction": call.direction.value,
                "attempt": attempt,
                "service": service_label,
                "outcome": outcome_label,
                "status_code": result.status_code,
                "error_kind": outcome.error_kind.value if outcome.error_kind else None,
                "duration_ms": round(call_seconds * 1000, 2),
            },
        )
        breaker = None
        if gate is not None and service is not None and result.failure is not CallFailure.TEMPLATE:
            failed = counts_as_failure(outcome)
            config = service.circuit_breaker
            breaker = BreakerUpdate(gate.service, lambda b, now: after_call(config, b, now, failed))
        more = await self._record(
            work,
            spec,
            call,
            attempt,
            result,
            outcome,
            transition,
            request,
            service,
            started,
            breaker,
        )
        self.failpoints.hit("after_commit")
        return more

    async def _record(
        self,
        work: SagaWork,
        spec: DefinitionSpec,
        call: Call,
        attempt: int,
        result: CallResult,
        outcome: Outcome,
        transition: Transition,
        request: HttpRequest | None,
        service: ServiceSpec | None,
        started: float,
        breaker: BreakerUpdate | None,
        cut_off: bool = False,
    ) -> bool:
        """Commit an attempt's outcome, the step's and saga's new state, and what is next.

        `cut_off`: the attempt was already closed as abandoned; only its consequence is new.
        """
        step_spec = spec.steps[call.index]
        row = work.steps[call.index]
        forward = call.direction is Direction.ACTION
        duration_ms = (time.monotonic() - started) * 1000
        last_error = None
        if not outcome.success:
            last_error = {
                "kind": outcome.error_kind.value if outcome.error_kind else None,
                "message": outcome.message,
                "status_code": result.status_code,
                "attempt": attempt,
                "direction": call.direction.value,
            }
        response = row.response
        status_code = row.status_code
        if forward:
            if outcome.success:
                response, status_code = result.body, result.status_code
            elif transition.use_fallback and step_spec.fallback is not None:
                response, status_code = step_spec.fallback.response, result.status_code
            else:
                status_code = result.status_code
        step_done = transition.step_status not in (StepStatus.RUNNING, StepStatus.COMPENSATING)
        events: list[EventRecord] = []
        if cut_off:
            events.append(
                EventRecord(
                    type="attempts_exhausted",
                    step=row.name,
                    direction=call.direction,
                    attempt=attempt,
                    outcome=AttemptOutcome.FAILED,
                    error_kind=outcome.error_kind,
                    message=outcome.message,
                )
            )
        else:
            events.append(
                EventRecord(
                    type="attempt_finished",
                    step=row.name,
                    direction=call.direction,
                    attempt=attempt,
                    outcome=(
                        AttemptOutcome.SUCCEEDED
                        if outcome.success
                        else AttemptOutcome.RETRYABLE
                        if transition.retry_in is not None
                        else AttemptOutcome.FAILED
                    ),
                    status_code=result.status_code,
                    error_kind=outcome.error_kind,
                    message=outcome.message or None,
                    duration_ms=duration_ms,
                )
            )
        if transition.use_fallback:
            events.append(EventRecord("fallback_used", step=row.name))

        # Apply to the in-memory copy, then see whether the saga can finish in this commit.
        old_status = work.status
        row.status = transition.step_status
        row.maybe_applied = transition.maybe_applied
        row.response, row.status_code = response, status_code
        work.status = transition.saga_status
        if transition.saga_status is SagaStatus.COMPENSATING and old_status is SagaStatus.RUNNING:
            err = transition.saga_error
            events.append(
                EventRecord(
                    "compensation_started",
                    step=row.name,
                    error_kind=err.kind if err else None,
                    message=err.message if err else None,
                )
            )
        saga_status = transition.saga_status
        delay = 0.0
        if transition.retry_in is not None:
            next_step = Next.LATER
            delay = transition.retry_in
            if work.deadline_at is not None and forward:
                elapsed = duration_ms / 1000
                until_deadline = (work.deadline_at - work.db_now).total_seconds() - elapsed
                delay = max(0.0, min(delay, until_deadline))
        elif transition.continue_now:
            follow = plan(spec, _state(work), work.db_now)
            if isinstance(follow, Finish):
                saga_status, next_step = follow.status, Next.IDLE
            else:
                next_step = Next.IDLE if follow is None else Next.CONTINUE
        else:
            next_step = Next.IDLE
        if saga_status.terminal and old_status is not saga_status:
            events.extend(_finish_events(saga_status))
        dead_letter = None
        if transition.dead_letter:
            dead_letter = DeadLetterRecord(
                step_idx=call.index,
                step_name=row.name,
                direction=call.direction,
                service=(
                    step_spec.action if forward else step_spec.compensation or step_spec.action
                ).service,
                attempts=attempt,
                last_error=last_error,
                request=request.redacted(set(service.headers) if service else set())
                if request
                else None,
            )
        work.status = old_status  # _commit sets what was actually written
        next_step = await self._commit(
            work,
            SagaWrite(
                saga_status,
                next_step,
                error=transition.saga_error.as_json() if transition.saga_error else None,
                delay_seconds=delay,
            ),
            step=StepWrite(
                idx=call.index,
                status=transition.step_status,
                forward=forward,
                maybe_applied=transition.maybe_applied,
                status_code=status_code,
                response=response,
                last_error=last_error,
                keep_error=outcome.success and not forward,
                done=step_done,
            ),
            events=tuple(events),
            dead_letter=dead_letter,
            breaker=breaker,
            pivot=(
                (
                    PivotOutcome.SUCCEEDED
                    if transition.step_status is StepStatus.SUCCEEDED
                    else PivotOutcome.NOT_YET
                )
                if forward and step_spec.pivot
                else None
            ),
        )
        if next_step is Next.LATER:
            self._wake_at(delay)
        return next_step is Next.CONTINUE

    async def _commit(
        self,
        work: SagaWork,
        saga: SagaWrite,
        step: StepWrite | None = None,
        events: tuple[EventRecord, ...] = (),
        dead_letter: DeadLetterRecord | None = None,
        breaker: BreakerUpdate | None = None,
        pivot: PivotOutcome | None = None,
    ) -> Next:
        """Commit; returns what follows, which a cancel accepted meanwhile may change."""
        cancellable = work.status is SagaStatus.RUNNING and saga.status is SagaStatus.COMPLETED
        committed = await self.store.commit(
            work, saga, step, events, dead_letter, breaker, cancellable, pivot
        )
        if committed is None:
            raise LeaseLost
        if committed.status.terminal and committed.status is not work.status:
            self.metrics.sagas_finished.labels(work.definition_name, committed.status.value).inc()
        work.status = committed.status
        work.cancel_requested = committed.cancel_requested
        work.db_now = committed.db_now
        return committed.next

    def _wake_at(self, delay: float) -> None:
        """Look for due work again when a saga we just scheduled becomes due."""
        if delay < self.settings.poll_interval_seconds:
            asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _gate(
        self,
        name: str,
        cached: _CachedService,
        work: SagaWork,
        spec: DefinitionSpec,
        forward: bool,
    ) -> Gate:
        """Breaker and bulkhead admission for a call to `name`, with jittered rechecks."""
        assert cached.spec is not None

        def decide(
            service: ServiceSpec, breaker: Breaker, now: datetime, live: int, probes: int
        ) -> Admission:
            admission = admit(
                service.circuit_breaker, breaker, now, live, probes, service.max_concurrency
            )
            if admission.retry_at is not None and admission.wait is not WaitReason.CIRCUIT_OPEN:
                jitter = timedelta(seconds=random.uniform(0, BULKHEAD_RECHECK_SECONDS))
                admission = replace(admission, retry_at=admission.retry_at + jitter)
            return admission

        unwindable = forward and not pivot_passed(spec, _state(work))
        return Gate(
            name, cached.spec, cached.version, decide, work.deadline_at if unwindable else None
        )

    async def _with_lease(self, work: SagaWork, call: Awaitable[T], call_seconds: float) -> T:
        """Await a participant call, renewing the lease while it is in flight."""
        task = asyncio.ensure_future(call)
        interval = max(self.settings.lease_seconds / 3, 0.1)
        self._calls_end[work.id] = time.monotonic() + call_seconds
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=interval)
                if done:
                    return task.result()
                if not await self.store.renew(work.id, work.epoch):
                    raise LeaseLost
        finally:
            self._calls_end.pop(work.id, None)
            if not task.done():
                task.cancel()

    # --- caches ------------------------------------------------------------------------

    async def _definition(self, definition_id: int) -> DefinitionSpec:
        spec = self._definitions.get(definition_id)
        if spec is None:
            record = await self.registry.get_definition_by_id(definition_id)
            if record is None:
                raise RuntimeError(f"definition {definition_id} vanished")
            spec = self._definitions[definition_id] = record.spec
        return spec

    async def _service(self, name: str) -> _CachedService:
        """The executor's copy of a service. It is never trusted alone: start_attempt
        compares its version with the database's in the same transaction and brings the
        current one, so a change is seen by every call that starts after it."""
        cached = self._services.get(name)
        if cached is None or cached.spec is None:
            record = await self.registry.get_service(name)
            cached = _CachedService(record.spec, record.version) if record else _ABSENT
            if record is not None:
                self._services[name] = cached
        return cached


def _state(work: SagaWork) -> SagaState:
    return SagaState(
        status=work.status,
        steps=[
            StepState(s.name, s.status, s.attempts, s.compensation_attempts, s.maybe_applied)
            for s in work.steps
        ],
        cancel_requested=work.cancel_requested,
        deadline_at=work.deadline_at,
        waiting_on=work.waiting_on,
    )


def _park_record(work: SagaWork, spec: DefinitionSpec | None) -> ParkRecord:
    """The step a saga that keeps failing the executor is parked at: the one it was on."""
    if work.status is SagaStatus.COMPENSATING:
        direction = Direction.COMPENSATION
        candidates = [
            i
            for i in range(len(work.steps) - 1, -1, -1)
            if spec is None or needs_compensation(spec.steps[i], _state(work).steps[i])
        ]
    else:
        direction = Direction.ACTION
        candidates = [i for i, s in enumerate(work.steps) if s.status not in FORWARD_DONE]
    index = candidates[0] if candidates else len(work.steps) - 1
    row = work.steps[index]
    call = None
    if spec is not None:
        step = spec.steps[index]
        call = step.action if direction is Direction.ACTION else step.compensation
    return ParkRecord(
        step_idx=index,
        step_name=row.name,
        direction=direction,
        service=call.service if call else None,
        attempts=row.attempts if direction is Direction.ACTION else row.compensation_attempts,
    )


def _context(work: SagaWork, lenient: bool = False) -> RenderContext:
    return RenderContext(
        input=work.input,
        saga_id=str(work.id),
        absent_results_as_null=lenient,
        step_results={
            s.name: (s.status_code, s.response)
            for s in work.steps
            if s.status in (StepStatus.SUCCEEDED, StepStatus.FALLBACK)
            or s.response is not None
            or s.status_code is not None
        },
    )


def _finish_events(status: SagaStatus) -> tuple[EventRecord, ...]:
    return (EventRecord(f"saga_{status.value}"),)


async def _wait_any(waits: list[Awaitable[Any]], within: float) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
