"""Delivering completion notifications: the saga's view, POSTed to its target once the
saga is terminal, at least once, always with the same Idempotency-Key.

The worker whose commit made the saga terminal delivers at once, in the background of
that saga's task; a claim loop picks up every notification that is due (a retry, a
crash between the terminal commit and the delivery, an operator's retry). A call to a
service goes through its breaker (open: not called, no attempt spent, due again when it
may probe) and takes a bulkhead slot for its duration; its outcome counts for the
breaker as any call's does. What a result means is `app.core.notify`'s to say.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from app.core.breaker import Breaker, Passage, after_call, gate, recheck_after
from app.core.commit import BreakerChange
from app.core.notify import after_attempt, notify_request
from app.core.outcome import CallFailure, CallResult
from app.core.states import NotificationStatus, WaitReason
from app.core.templates import TemplateError
from app.engine.failpoints import Failpoints
from app.engine.ports import (
    Caller,
    NotificationJob,
    Notifications,
    NotifyFinish,
    NotifyRefusal,
    NotifyStart,
    NotifyStarted,
    SagaRepository,
    ServiceView,
)
from app.engine.services import ServiceCache
from app.engine.waiting import renewing, sleep_or_stop
from app.logs import describe_error, known_secrets, safe_traceback
from app.telemetry.metrics import Metrics

log = logging.getLogger("app.engine.notifier")
T = TypeVar("T")
GUARD_ROUNDS = 4
MIN_CLAIM_SPACING_SECONDS = 0.2  # between two claims, however often it is woken
NOTIFY_WAKE = "notify"  # the work channel's payload that wakes the notification loop


class Notifier:
    def __init__(
        self,
        store: Notifications,
        repo: SagaRepository,
        caller: Caller,
        services: ServiceCache,
        failpoints: Failpoints,
        metrics: Metrics,
        lease_seconds: float,
        poll_interval_seconds: float,
        concurrency: int,
    ) -> None:
        self.store = store
        self.repo = repo
        self.caller = caller
        self.services = services
        self.failpoints = failpoints
        self.metrics = metrics
        self.lease_seconds = lease_seconds
        self.poll_interval_seconds = poll_interval_seconds
        self.concurrency = max(1, concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def _wake_in(self, delay: float) -> None:
        """Look again when a notification this process scheduled is due (another
        process finds it at its next idle poll should this one be gone by then)."""
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake.set)

    # --- the terminal commit's own delivery --------------------------------------------

    def armed(self, saga_id: uuid.UUID, epoch: int) -> None:
        """The commit that made the saga terminal armed its notification for this worker:
        deliver it now, in the background."""
        self._spawn(self._deliver_held(saga_id, epoch))

    async def _deliver_held(self, saga_id: uuid.UUID, epoch: int) -> None:
        self.failpoints.hit("before_notify")
        job = await self.store.held_notification(saga_id, epoch)
        if job is not None:
            await self.deliver(job)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Awaitable[None]) -> None:
        """A delivery never takes the executor down: its row stays due (the lease ends)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.repo.outage(exc):
                log.warning("notification left to its lease", extra={"error": describe_error(exc)})
            else:
                log.error(
                    "notification delivery failed",
                    extra={"error_type": type(exc).__name__, "where": safe_traceback(exc)},
                )

    # --- the claim loop ----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim due notifications. While none are found, the loop polls only once per
        lease (a crash's notification is not due before its lease ends anyway), so a
        deployment without notification targets pays one small statement per lease per
        process; it is woken for what this process scheduled and for an operator's retry."""
        error_delay = 0.1
        idle = max(self.poll_interval_seconds, self.lease_seconds)
        while not stop.is_set():
            wait = idle
            free = self.concurrency - len(self._tasks)
            if free > 0:
                self._wake.clear()
                try:
                    jobs = await self.store.claim_notifications(free)
                    error_delay = 0.1
                except Exception as exc:  # an outage, or a bug: never end the loop for it
                    level = logging.WARNING if self.repo.outage(exc) else logging.ERROR
                    log.log(
                        level, "notification claim failed", extra={"error": describe_error(exc)}
                    )
                    await sleep_or_stop(stop, error_delay)
                    error_delay = min(error_delay * 2, 5.0)
                    continue
                for job in jobs:
                    self._spawn(self.deliver(job))
                if jobs and len(jobs) == free:
                    await sleep_or_stop(stop, MIN_CLAIM_SPACING_SECONDS)
                    continue
                if jobs:
                    wait = self.poll_interval_seconds
            else:
                wait = self.poll_interval_seconds  # deliveries under way: look again soon
            await sleep_or_stop(stop, MIN_CLAIM_SPACING_SECONDS)
            waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def drain(self, grace_seconds: float) -> None:
        """Let deliveries under way end within the grace period; the rest are due again
        when their leases end."""
        if not self._tasks:
            return
        _done, still = await asyncio.wait(list(self._tasks), timeout=grace_seconds)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still)

    # --- one attempt -------------------------------------------------------------------

    async def deliver(self, job: NotificationJob) -> None:
        """One delivery attempt of a notification this worker holds (or none, when the
        service's breaker or bulkhead says not now)."""
        name = job.notify.service
        view = await self.services.get(name) if name else None
        breaker: Breaker | None = None
        started: NotifyStarted | NotifyRefusal = NotifyRefusal.FENCED
        now = job.db_now
        for _ in range(GUARD_ROUNDS):
            start = NotifyStart()
            if view is not None:
                decision = gate(view.spec.circuit_breaker, view.breaker, now)
                if decision.passage is not Passage.CALL and not self.services.fresh(view):
                    view = await self.services.refresh(view.name)
                    continue
                if decision.passage is Passage.WAIT:
                    assert decision.retry_at is not None
                    self.metrics.notification_attempts.labels(view.name, "circuit_open").inc()
                    delay = (decision.retry_at - now).total_seconds()
                    await self.store.postpone_notification(job, delay)
                    self._wake_in(delay)
                    return
                breaker = decision.breaker
                start = NotifyStart(
                    service=view.name,
                    version=view.version,
                    passage=decision.passage,
                    breaker=view.breaker,
                    breaker_after=decision.breaker,
                )
            started = await self.store.start_notification(job, start)
            if started is NotifyRefusal.STALE and name is not None:
                view = await self.services.refresh(name)
                continue
            break
        if started is NotifyRefusal.FENCED:
            return
        if isinstance(started, NotifyRefusal):  # a full bulkhead, or the guards kept moving
            assert view is not None
            recheck = recheck_after(WaitReason.BULKHEAD_FULL, view.spec.circuit_breaker)
            delay = recheck + random.uniform(0, recheck)
            self.metrics.notification_attempts.labels(view.name, "bulkhead_full").inc()
            await self.store.postpone_notification(job, delay)
            self._wake_in(delay)
            return
        await self._attempt(job, started, view, breaker)

    async def _attempt(
        self,
        job: NotificationJob,
        started: NotifyStarted,
        view: ServiceView | None,
        breaker: Breaker | None,
    ) -> None:
        began = time.monotonic()
        body = await self.store.saga_view(job.saga_id)
        request = None
        if body is None:  # the saga is gone (retention): nothing to tell
            result = CallResult(failure=CallFailure.TEMPLATE, message="the saga no longer exists")
        else:
            try:
                request = notify_request(
                    job.notify,
                    view.spec if view else None,
                    job.saga_id,
                    job.saga_status,
                    json.loads(body),
                )
            except TemplateError as exc:
                result = CallResult(failure=CallFailure.TEMPLATE, message=str(exc))
        if request is not None:
            result = await self._with_lease(
                job,
                self.caller.call(request, send_by=began + self.lease_seconds / 2),
            )
        result = replace(result, message=known_secrets.redact(result.message))
        delivery = after_attempt(job.notify, started.attempt, result)
        service = view.name if view else None
        label = service or "(url)"
        outcome = {
            NotificationStatus.DELIVERED: "delivered",
            NotificationStatus.PENDING: "retryable",
            NotificationStatus.FAILED: "failed",
        }[delivery.status]
        self.metrics.notification_attempts.labels(label, outcome).inc()
        log.info(
            "notification attempt",
            extra={
                "saga_id": str(job.saga_id),
                "attempt": started.attempt,
                "service": label,
                "outcome": outcome,
                "status_code": result.status_code,
                "duration_ms": round((time.monotonic() - began) * 1000, 2),
            },
        )
        secret = set(job.notify.headers) | (set(view.spec.headers) if view else set())
        redacted: dict[str, Any] | None = None
        if request is not None:
            redacted = {**request.redacted(secret), "body": None}
        written = await self.store.finish_notification(
            job,
            NotifyFinish(
                attempt=started.attempt,
                status=delivery.status,
                delay_seconds=delivery.delay_seconds,
                error=delivery.error,
                event=delivery.event,
                status_code=result.status_code,
                dead_letter=delivery.dead_letter,
                service=service,
                request=redacted,
            ),
        )
        if view is not None and breaker is not None and result.failure is not CallFailure.TEMPLATE:
            await self._count(view, breaker, started, delivery.breaker_failure)
        if written and delivery.status is NotificationStatus.PENDING:
            self._wake_in(delivery.delay_seconds)

    async def _count(
        self, view: ServiceView, breaker: Breaker, started: NotifyStarted, failed: bool
    ) -> None:
        """The call's effect on the service's breaker, compare-and-set (a few rounds)."""
        config = view.spec.circuit_breaker
        for _ in range(GUARD_ROUNDS):
            after = after_call(config, breaker, started.db_now, failed)
            if after == breaker:
                return
            now = await self.repo.apply_breaker(BreakerChange(view.name, breaker, after))
            if now is None:
                self.services.breaker_moved(view.name, after)
                return
            breaker = now

    async def _with_lease(self, job: NotificationJob, call: Awaitable[T]) -> T:
        """Await the call, holding the notification (and its slot) while it is in flight
        (a hold lost meanwhile is caught by the fenced finish)."""

        async def renew() -> None:
            await self.store.renew_notification(job)

        return await renewing(call, max(self.lease_seconds / 3, 0.1), renew)
