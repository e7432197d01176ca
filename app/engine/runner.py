"""The step executor: claims due sagas and drives each one (`driver.Driver`).

For every call: record the attempt as started (a commit), call the participant while
renewing the lease, then commit the outcome together with the saga's new status and
what comes next. A crash anywhere leaves the saga due again once its lease expires;
the participant may then see the same call again, always with the same Idempotency-Key.
Any number of executors may share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.core.commit import Commit
from app.core.decide import CRASH_LIMIT, park_point
from app.core.definition import DefinitionSpec
from app.core.outcome import CallResult, Outcome
from app.core.requests import HttpRequest
from app.core.states import AttemptOutcome, Direction, EventType, SagaStatus, WaitReason
from app.engine.driver import Driver, LeaseLost, Prestarted, SagaRun
from app.engine.failpoints import Failpoints
from app.engine.notifier import NOTIFY_WAKE, Notifier
from app.engine.ports import Caller, Claimed, Lease, Notifications, Park, SagaRepository
from app.engine.services import ServiceCache
from app.engine.waiting import renewing, sleep_or_stop
from app.logs import describe_error, safe_traceback
from app.telemetry.metrics import Metrics
from app.telemetry.tracing import Tracing

log = logging.getLogger("app.engine.executor")
T = TypeVar("T")
PRUNE_EVERY_SECONDS = 60.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    lease_seconds: float = 15.0
    concurrency: int = 32
    poll_interval_seconds: float = 1.0
    shutdown_grace_seconds: float = 20.0
    failpoint: str | None = None
    retention_seconds: float | None = None  # None: finished sagas are kept forever
    # Where callback steps' participants report (SAGA_PUBLIC_URL + /v1/callbacks/).
    callback_url: str = "http://127.0.0.1:8000/v1/callbacks/"


class Executor:
    """Runs sagas until `stop` is set."""

    def __init__(
        self,
        repo: SagaRepository,
        caller: Caller,
        config: EngineConfig,
        worker_id: str,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        on_denied: Callable[[Lease, WaitReason], None] | None = None,
        on_finished: Callable[[uuid.UUID], None] | None = None,
        notifications: Notifications | None = None,
    ) -> None:
        self.repo = repo
        self.caller = caller
        self.config = config
        self.worker_id = worker_id
        self.lease_seconds = config.lease_seconds
        self.callback_url = config.callback_url
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing()
        self.failpoints = Failpoints(config.failpoint)
        self.services = ServiceCache(repo)
        self.driver = Driver(self)
        self.notifier = (
            Notifier(
                notifications,
                repo,
                caller,
                self.services,
                self.failpoints,
                self.metrics,
                config.lease_seconds,
                config.poll_interval_seconds,
                config.concurrency,
            )
            if notifications is not None
            else None
        )
        self.on_denied = on_denied
        self.on_finished = on_finished
        self.running = False
        self._definitions: dict[int, DefinitionSpec] = {}
        self._tasks: dict[asyncio.Task[None], Lease] = {}
        self._unfinished: set[uuid.UUID] = set()  # driven here, not ended by this process
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._calls_end: dict[uuid.UUID, float] = {}  # monotonic time each call times out

    def wake(self, payload: str = "") -> None:
        """New work may be due (a notification arrived). Only an operator's retry of a
        notification's dead letter (payload `notify`) wakes the notification loop: the
        sagas' own wake-ups cost it nothing, it polls otherwise."""
        self._wake.set()
        if payload == NOTIFY_WAKE and self.notifier is not None:
            self.notifier.wake()

    def has_room(self) -> bool:
        """Whether this executor runs and can take one more saga now."""
        return self.running and len(self._tasks) < self.config.concurrency

    def adopt(self, claimed: Claimed, spec: DefinitionSpec, first: object = None) -> None:
        """Drive a saga this process just created and leased to itself (no claim);
        `first`: the `FirstAttempt.prepared` its creating statement started."""
        self._definitions.setdefault(claimed.definition_id, spec)
        prestarted = first if isinstance(first, Prestarted) else None
        if prestarted is not None:
            prestarted.attempt = 1
        self._start_task(claimed, prestarted)

    def holds(self, saga_id: uuid.UUID) -> bool:
        """Whether a task of this executor drives the saga and has not ended it."""
        return saga_id in self._unfinished

    def _start_task(self, claimed: Claimed, prestarted: Prestarted | None = None) -> None:
        saga_id = claimed.lease.saga_id
        self._unfinished.add(saga_id)
        task = asyncio.create_task(self._run_saga(claimed, prestarted))
        self._tasks[task] = claimed.lease
        task.add_done_callback(lambda t: self._task_done(t, saga_id))

    # --- main loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        prune_task = asyncio.create_task(self._prune_loop(), name="executor-prune")
        notify_task = (
            asyncio.create_task(self.notifier.run(stop), name="executor-notify")
            if self.notifier is not None
            else None
        )
        log.info("executor started", extra={"worker": self.worker_id})
        self.running = True
        try:
            await self._claim_loop(stop)
        finally:
            self.running = False
            prune_task.cancel()
            if notify_task is not None:
                notify_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await notify_task
            await self._drain()
            if self.notifier is not None:
                await self.notifier.drain(self.config.shutdown_grace_seconds)
            await self.repo.close()
            log.info("executor stopped", extra={"worker": self.worker_id})

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        error_delay = 0.1
        while not stop.is_set():
            free = self.config.concurrency - len(self._tasks)
            claimed: list[Claimed] = []
            if free > 0:
                self._wake.clear()
                try:
                    claimed = await self.repo.claim(free)
                    error_delay = 0.1
                except Exception as exc:
                    if not self.repo.outage(exc):
                        raise
                    log.warning("claim failed", extra={"error": describe_error(exc)})
                    await sleep_or_stop(stop, error_delay)
                    error_delay = min(error_delay * 2, 5.0)
                    continue
                self.failpoints.hit("while_claiming")
                for one in claimed:
                    self._start_task(one)
            if claimed and len(claimed) == free:
                continue  # probably more due work; claim again once a slot frees
            if free <= 0:
                self._slot_freed.clear()
                waits: list[Awaitable[Any]] = [self._slot_freed.wait(), stop.wait()]
            else:
                waits = [self._wake.wait(), stop.wait()]
            await _wait_any(waits, within=self.config.poll_interval_seconds)

    def _task_done(self, task: asyncio.Task[None], saga_id: uuid.UUID) -> None:
        self._tasks.pop(task, None)
        self._unfinished.discard(saga_id)
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
        _done, still = await asyncio.wait(list(pending), timeout=self.config.shutdown_grace_seconds)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)
        now = time.monotonic()
        for task in still:
            lease = pending[task]
            call_ends = self._calls_end.pop(lease.saga_id, now)
            try:
                await self.repo.release(lease, max(0.0, call_ends - now))
            except Exception as exc:  # the lease expires on its own anyway
                log.warning(
                    "release failed",
                    extra={"saga_id": str(lease.saga_id), "error": describe_error(exc)},
                )

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY_SECONDS)
            try:
                await self.repo.prune_idempotency_keys()
            except Exception as exc:
                log.warning("pruning idempotency keys failed", extra={"error": describe_error(exc)})
            if self.config.retention_seconds:
                await self.prune_finished(self.config.retention_seconds)

    async def prune_finished(self, older_than_seconds: float) -> None:
        """One retention pass (unless another process runs one), counted in the metrics."""
        try:
            pruned = await self.repo.prune_finished(older_than_seconds)
        except Exception as exc:
            log.warning("pruning finished sagas failed", extra={"error": describe_error(exc)})
            return
        if pruned is None or not pruned.sagas:
            return
        for table, rows in pruned.counts().items():
            self.metrics.pruned_rows.labels(table).inc(rows)
        log.info("pruned finished sagas", extra=pruned.counts())

    # --- one saga ----------------------------------------------------------------------

    async def _run_saga(self, claimed: Claimed, prestarted: Prestarted | None = None) -> None:
        run: SagaRun | None = None
        saga_id = str(claimed.lease.saga_id)
        try:
            spec = await self._definition(claimed.definition_id)
            run = SagaRun(claimed, spec, claimed.state, claimed.db_now, prestarted)
            await self.driver.drive(run)
        except LeaseLost:
            self._unfinished.discard(claimed.lease.saga_id)
            log.info("lease lost", extra={"saga_id": saga_id, "worker": self.worker_id})
        except Exception as exc:
            if self.repo.outage(exc):
                # The database cannot be reached: the lease expires and another claim
                # redoes the unfinished attempt.
                log.warning(
                    "database unavailable, saga left to lease expiry",
                    extra={"saga_id": saga_id, "error_type": type(exc).__name__},
                )
                return
            # Not a participant's doing (those are outcomes) nor an outage: a bug or data
            # the engine cannot handle. Never let the saga be claimed into it forever.
            self._unfinished.discard(claimed.lease.saga_id)  # it may be parked, terminal
            await self._crashed(claimed, run, exc)

    async def _crashed(self, claimed: Claimed, run: SagaRun | None, exc: Exception) -> None:
        log.error(
            "saga task failed",
            extra={
                "saga_id": str(claimed.lease.saga_id),
                "error_type": type(exc).__name__,
                "where": safe_traceback(exc),
            },
        )
        spec = run.spec if run else self._definitions.get(claimed.definition_id)
        state = run.state if run else claimed.state
        index, direction = park_point(spec, state)
        step = state.steps[index]
        target = None
        if spec is not None:
            step_spec = spec.steps[index]
            target = step_spec.action if direction is Direction.ACTION else step_spec.compensation
        park = Park(
            step_index=index,
            step_name=step.name,
            direction=direction,
            service=target.service if target else None,
            attempts=step.attempts if direction is Direction.ACTION else step.compensation_attempts,
        )
        try:
            crashes = await self.repo.record_crash(claimed.lease, type(exc).__name__, park)
        except Exception as again:  # the lease expires; the count did not move
            log.error(
                "recording the failure failed",
                extra={"saga_id": str(claimed.lease.saga_id), "error_type": type(again).__name__},
            )
            return
        if crashes >= CRASH_LIMIT:
            self.metrics.sagas_finished.labels(claimed.definition_name, "failed").inc()

    async def _definition(self, definition_id: int) -> DefinitionSpec:
        spec = self._definitions.get(definition_id)
        if spec is None:
            spec = self._definitions[definition_id] = await self.repo.definition(definition_id)
        return spec

    # --- what the driver asks of its host ----------------------------------------------

    async def send(
        self,
        run: SagaRun,
        step: str,
        direction: Direction,
        attempt: int,
        request: HttpRequest,
        send_by: float,
    ) -> CallResult:
        attributes: dict[str, str | int] = {
            "saga.id": str(run.lease.saga_id),
            "saga.step": step,
            "saga.direction": direction.value,
            "saga.attempt": attempt,
        }
        self.metrics.local_in_flight.inc()
        try:
            with self.tracing.call_span(
                run.claimed.traceparent, f"{step} {direction.value}", attributes
            ) as trace_headers:
                request.headers.update(trace_headers)
                return await self._with_lease(
                    run.lease, self.caller.call(request, send_by=send_by), request.timeout_seconds
                )
        finally:
            self.metrics.local_in_flight.dec()

    async def _with_lease(self, lease: Lease, call: Awaitable[T], call_seconds: float) -> T:
        """Await a participant call, renewing the lease while it is in flight."""

        async def renew() -> None:
            if not await self.repo.renew(lease):
                raise LeaseLost

        self._calls_end[lease.saga_id] = time.monotonic() + call_seconds
        try:
            return await renewing(call, max(self.config.lease_seconds / 3, 0.1), renew)
        finally:
            self._calls_end.pop(lease.saga_id, None)

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
    ) -> None:
        """One attempt ended: its metrics and its log line (never its data)."""
        label = next(
            (e.outcome for e in commit.events if e.type is EventType.ATTEMPT_FINISHED),
            AttemptOutcome.FAILED,
        )
        assert label is not None
        service_label = service or "(url)"
        self.metrics.attempts.labels(service_label, direction.value, label.value).inc()
        self.metrics.latency.labels(service_label, direction.value).observe(duration_ms / 1000)
        log.info(
            "attempt",
            extra={
                "saga_id": str(run.lease.saga_id),
                "request_id": run.claimed.request_id,
                "step": step,
                "direction": direction.value,
                "attempt": attempt,
                "service": service_label,
                "outcome": label.value,
                "status_code": result.status_code,
                "error_kind": outcome.error_kind.value if outcome.error_kind else None,
                "duration_ms": round(duration_ms, 2),
            },
        )

    def finished(self, run: SagaRun, status: SagaStatus) -> None:
        self._unfinished.discard(run.lease.saga_id)
        self.metrics.sagas_finished.labels(run.claimed.definition_name, status.value).inc()
        if self.on_finished is not None:  # long-polls in this process wake at once
            self.on_finished(run.lease.saga_id)

    def notification_armed(self, run: SagaRun, epoch: int) -> None:
        """The terminal commit armed the saga's notification for this worker."""
        if self.notifier is not None:
            self.notifier.armed(run.lease.saga_id, epoch)

    def denied(self, run: SagaRun, reason: WaitReason) -> None:
        if self.on_denied is not None:
            self.on_denied(run.lease, reason)

    def wake_at(self, delay: float) -> None:
        """Look for due work again when a saga we just scheduled becomes due."""
        if delay < self.config.poll_interval_seconds:
            asyncio.get_running_loop().call_later(delay, self._wake.set)


async def _wait_any(waits: list[Awaitable[Any]], within: float) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
