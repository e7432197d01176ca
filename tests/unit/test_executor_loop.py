"""The executor loop, end to end, on the in-memory repository and a fake clock: claim →
start → call → decide → commit, with compensation, cancel, deadline, pivot, breaker,
bulkhead, cut-off attempts and a completion that yields to a cancel. No database and no
network: every participant answer is scripted, and time moves only when the test says.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.core.breaker import Passage
from app.core.commit import SagaState
from app.core.definition import DefinitionSpec, ServiceSpec
from app.core.outcome import CallFailure, CallResult
from app.core.requests import HttpRequest
from app.core.states import (
    AttemptOutcome,
    CircuitState,
    Direction,
    ErrorKind,
    EventType,
    SagaStatus,
    StepStatus,
    WaitReason,
)
from app.engine.driver import LeaseLost, SagaRun
from app.engine.ports import StartAttempt, Started
from app.engine.runner import EngineConfig, Executor
from tests.support.memory import FakeClock, MemoryRepository

S, T = SagaStatus, StepStatus
OK = CallResult(status_code=200, body={"id": "ok"})
BUSY = CallResult(status_code=503, message="participant answered 503")
NO = CallResult(status_code=400, message="participant answered 400")
TIMEOUT = CallResult(failure=CallFailure.TIMEOUT, message="no answer within 1s")


class Script:
    """A participant caller: answers each path from its script, else 200."""

    def __init__(self) -> None:
        self.replies: dict[str, list[CallResult]] = defaultdict(list)
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.during: dict[str, Any] = {}  # path -> a callback run while that call is "in flight"

    def answer(self, path: str, *replies: CallResult) -> None:
        self.replies[path].extend(replies)

    async def call(self, request: HttpRequest, send_by: float | None = None) -> CallResult:
        path = urlsplit(request.url).path
        self.calls.append((path, dict(request.headers)))
        if path in self.during:
            self.during.pop(path)()
        queue = self.replies.get(path)
        return queue.pop(0) if queue else OK

    async def aclose(self) -> None:
        pass

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


def definition(*steps: dict[str, Any], **extra: Any) -> DefinitionSpec:
    return DefinitionSpec.model_validate({"name": "flow", "steps": list(steps), **extra})


def step(name: str, compensate: bool = True, **extra: Any) -> dict[str, Any]:
    retry = {"max_attempts": 3, "initial_interval_seconds": 1, "jitter": False}
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": "svc", "path": f"/{name}"},
        "retry": retry,
        "compensation_retry": retry,
    }
    if compensate:
        doc["compensation"] = {"service": "svc", "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


class World:
    def __init__(self, **service: Any) -> None:
        self.clock = FakeClock()
        self.repo = MemoryRepository(self.clock)
        self.script = Script()
        self.repo.add_service(
            "svc", ServiceSpec.model_validate({"base_url": "http://svc.test", **service})
        )
        self.executor = Executor(self.repo, self.script, EngineConfig(lease_seconds=10), "w1")

    async def settle(self, rounds: int = 200, strict: bool = True) -> None:
        """Claim and drive until nothing is due; time jumps to the next due saga (with
        `strict=False`, just `rounds` rounds: a wait is always due again)."""
        for _ in range(rounds):
            claimed = await self.repo.claim(10)
            if not claimed:
                due = self.repo.next_due()
                if due is None:
                    return
                self.clock.now = max(self.clock.now, due)
                continue
            for one in claimed:
                spec = await self.repo.definition(one.definition_id)
                await self.executor.driver.drive(SagaRun(one, spec, one.state, one.db_now))
        if strict:
            raise AssertionError("the sagas did not settle")

    def state(self, saga_id: uuid.UUID) -> SagaState:
        return self.repo.rows[saga_id].state

    def statuses(self, saga_id: uuid.UUID) -> list[StepStatus]:
        return [s.status for s in self.state(saga_id).steps]


async def test_the_happy_path_completes_in_order() -> None:
    w = World()
    saga = w.repo.start(definition(step("a"), step("b"), step("c")))
    await w.settle()
    assert w.state(saga).status is S.COMPLETED
    assert w.statuses(saga) == [T.SUCCEEDED] * 3
    assert w.script.paths() == ["/a", "/b", "/c"]
    kinds = w.repo.types(saga)
    assert kinds[0] is EventType.SAGA_STARTED and kinds[-1] is EventType.SAGA_COMPLETED
    assert kinds.count(EventType.ATTEMPT_STARTED) == kinds.count(EventType.ATTEMPT_FINISHED) == 3
    assert w.repo.rows[saga].due_at is None and w.repo.live_slots("svc") == 0
    # Every call carries the contract's headers, one key per step and direction.
    keys = [h["Idempotency-Key"] for _p, h in w.script.calls]
    assert keys == [f"{saga}:{n}:action" for n in "abc"]


async def test_a_retryable_answer_is_retried_after_its_backoff() -> None:
    w = World()
    w.script.answer("/b", BUSY, BUSY)
    saga = w.repo.start(definition(step("a"), step("b")))
    started = w.clock.now
    await w.settle()
    assert w.state(saga).status is S.COMPLETED
    assert w.state(saga).steps[1].attempts == 3
    # Backoff without jitter: 1 s, then 2 s, on the database's clock.
    assert (w.clock.now - started).total_seconds() == 3
    outcomes = [
        d for kind, name, d in w.repo.rows[saga].events if kind is EventType.ATTEMPT_FINISHED
    ]
    assert outcomes == [
        AttemptOutcome.SUCCEEDED,
        AttemptOutcome.RETRYABLE,
        AttemptOutcome.RETRYABLE,
        AttemptOutcome.SUCCEEDED,
    ]


async def test_a_permanent_failure_compensates_in_reverse_order() -> None:
    w = World()
    w.script.answer("/c", NO)
    saga = w.repo.start(definition(step("a"), step("b"), step("c")))
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.statuses(saga) == [T.COMPENSATED, T.COMPENSATED, T.FAILED]
    assert w.script.paths() == ["/a", "/b", "/c", "/b/undo", "/a/undo"]
    assert w.repo.rows[saga].error == {
        "step": "c",
        "kind": "http_status",
        "message": "participant answered 400",
    }


async def test_an_unknown_outcome_is_compensated_too() -> None:
    w = World()
    w.script.answer("/b", TIMEOUT, TIMEOUT, TIMEOUT)
    saga = w.repo.start(definition(step("a"), step("b")))
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths()[-2:] == ["/b/undo", "/a/undo"]


async def test_an_exhausted_compensation_fails_the_saga_with_a_dead_letter() -> None:
    w = World()
    w.script.answer("/b", NO)
    w.script.answer("/a/undo", BUSY, BUSY, BUSY)
    saga = w.repo.start(definition(step("a"), step("b")))
    await w.settle()
    assert w.state(saga).status is S.FAILED
    assert w.statuses(saga)[0] is T.COMPENSATION_FAILED
    assert w.repo.dead_letters == [(saga, "a", "compensation")]


async def test_a_cancel_between_steps_unwinds() -> None:
    w = World()
    spec = definition(step("a"), step("b"), step("c"))
    saga = w.repo.start(spec)
    w.script.during["/b"] = lambda: w.repo.cancel(saga)
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.repo.rows[saga].error["kind"] == "cancelled"  # type: ignore[index]
    assert "/c" not in w.script.paths()


async def test_a_completion_yields_to_a_cancel_accepted_during_the_last_call() -> None:
    w = World()
    saga = w.repo.start(definition(step("a"), step("b")))
    w.script.during["/b"] = lambda: w.repo.cancel(saga)
    await w.settle()
    # b succeeded (kept), then the saga unwound both steps instead of completing.
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths() == ["/a", "/b", "/b/undo", "/a/undo"]
    assert EventType.SAGA_COMPLETED not in w.repo.types(saga)


async def test_the_pivot_refuses_a_cancel_and_parks_a_later_failure() -> None:
    w = World()
    spec = definition(step("a"), step("b", pivot=True), step("c"))
    saga = w.repo.start(spec)
    refused: list[bool] = []
    w.script.during["/b"] = lambda: refused.append(w.repo.cancel(saga))
    w.script.answer("/c", NO)
    await w.settle()
    assert refused == [False], "a cancel while the pivot's call is in flight is refused"
    assert w.state(saga).status is S.FAILED
    assert w.statuses(saga) == [T.SUCCEEDED, T.SUCCEEDED, T.FAILED]
    assert w.repo.dead_letters == [(saga, "c", "action")]
    assert not any(p.endswith("/undo") for p in w.script.paths())


async def test_a_cancel_before_the_pivot_keeps_it_from_starting() -> None:
    w = World()
    saga = w.repo.start(definition(step("a"), step("b", pivot=True)))
    w.script.during["/a"] = lambda: w.repo.cancel(saga)
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths() == ["/a", "/a/undo"]


async def test_the_deadline_passes_while_a_retry_waits() -> None:
    w = World()
    w.script.answer("/b", BUSY, BUSY, BUSY)
    retry = {"max_attempts": 10, "initial_interval_seconds": 5, "jitter": False}
    saga = w.repo.start(definition(step("a"), step("b", retry=retry), timeout_seconds=8))
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.repo.rows[saga].error["kind"] == "deadline"  # type: ignore[index]
    # Attempts at 0 s and 5 s; the third would come at 15 s, past the deadline at 8 s:
    # the retry is moved to the deadline instead, and the saga unwinds then.
    assert w.state(saga).steps[1].attempts == 2


async def test_a_cut_off_attempt_is_abandoned_then_retried_within_its_policy() -> None:
    w = World()
    saga = w.repo.start(definition(step("a", retry={"max_attempts": 2, "jitter": False})))
    # A worker claims the saga and starts the attempt, then dies before its outcome.
    (claimed,) = await w.repo.claim(1)
    started = await w.repo.start_attempt(claimed.lease, StartAttempt(0, Direction.ACTION, "a"))
    assert started is not None
    w.clock.advance(11)  # its lease expires
    await w.settle()
    row = w.repo.rows[saga]
    assert row.state.status is S.COMPLETED
    assert row.state.steps[0].attempts == 2
    abandoned = [d for kind, _n, d in row.events if d is AttemptOutcome.ABANDONED]
    assert abandoned == [AttemptOutcome.ABANDONED]


async def test_no_attempt_beyond_the_policy_after_cut_offs() -> None:
    w = World()
    saga = w.repo.start(definition(step("a", retry={"max_attempts": 1, "jitter": False})))
    (claimed,) = await w.repo.claim(1)
    await w.repo.start_attempt(claimed.lease, StartAttempt(0, Direction.ACTION, "a"))
    w.clock.advance(11)
    await w.settle()
    assert w.script.paths() == ["/a/undo"], "the one allowed attempt was the cut-off one"
    assert w.state(saga).status is S.COMPENSATED
    assert EventType.ATTEMPTS_EXHAUSTED in w.repo.types(saga)


async def test_the_breaker_opens_waits_without_attempts_then_probes_and_closes() -> None:
    w = World(circuit_breaker={"failure_threshold": 2, "recovery_timeout_seconds": 30})
    w.script.answer("/a", BUSY, BUSY)
    retry = {"max_attempts": 5, "initial_interval_seconds": 1, "jitter": False}
    saga = w.repo.start(definition(step("a", retry=retry)))
    began = w.clock.now
    await w.settle()
    assert w.state(saga).status is S.COMPLETED
    # Two failures opened the circuit; the saga waited for the recovery timeout without
    # spending attempts, then the half-open probe (the third attempt) closed it.
    assert w.state(saga).steps[0].attempts == 3
    assert w.repo.breakers["svc"].state is CircuitState.CLOSED
    assert (w.clock.now - began).total_seconds() >= 30
    waits = [n for kind, n, _d in w.repo.rows[saga].events if kind is EventType.ATTEMPT_STARTED]
    assert len(waits) == 3


async def test_a_full_bulkhead_makes_the_saga_wait_not_fail() -> None:
    w = World(max_concurrency=1)
    spec = definition(step("a", compensate=False))
    first = w.repo.start(spec)
    second = w.repo.start(spec)
    # The first saga holds the only slot while the second one tries.
    held = w.repo.for_worker("w2")
    (one,) = await held.claim(1)
    assert one.lease.saga_id == first
    view = await w.repo.service("svc")
    assert view is not None
    start = StartAttempt(
        0,
        Direction.ACTION,
        "a",
        service="svc",
        version=view.version,
        passage=Passage.CALL,
        breaker=view.breaker,
        breaker_after=view.breaker,
    )
    assert isinstance(await held.start_attempt(one.lease, start), Started)
    assert w.repo.live_slots("svc") == 1
    (claimed,) = await w.repo.claim(1)
    assert claimed.lease.saga_id == second
    spec_ = await w.repo.definition(claimed.definition_id)
    await w.executor.driver.drive(SagaRun(claimed, spec_, claimed.state, claimed.db_now))
    row = w.repo.rows[second]
    assert row.state.waiting is not None and row.state.waiting.reason is WaitReason.BULKHEAD_FULL
    assert row.state.steps[0].attempts == 0  # no attempt spent
    assert row.due_at is not None and row.due_at > w.clock.now


async def test_poison_input_fails_as_template_and_nothing_is_sent() -> None:
    w = World()
    spec = definition(
        step("a"),
        {**step("b"), "action": {"service": "svc", "path": "/b", "headers": {"X": "${input.n}"}}},
    )
    saga = w.repo.start(spec, {"n": "Zoë"})
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths() == ["/a", "/a/undo"]
    assert w.repo.rows[saga].error["kind"] == ErrorKind.TEMPLATE.value  # type: ignore[index]


async def test_a_lost_lease_stops_the_worker_without_writing() -> None:
    w = World()
    saga = w.repo.start(definition(step("a"), step("b")))
    (claimed,) = await w.repo.claim(1)
    w.clock.advance(11)
    other = w.repo.for_worker("w2")
    (taken,) = await other.claim(1)
    assert taken.lease.epoch == claimed.lease.epoch + 1
    spec = await w.repo.definition(claimed.definition_id)
    with pytest.raises(LeaseLost):
        await w.executor.driver.drive(SagaRun(claimed, spec, claimed.state, claimed.db_now))
    assert w.state(saga).steps[0].attempts == 0, "the fenced-out worker wrote nothing"
    assert w.script.calls == []


# --- callback steps -------------------------------------------------------------------------

ACCEPTED = CallResult(status_code=202, body={"accepted": True})


def _token(w: World, call: int = -1) -> str:
    from app.core.callbacks import token_hash

    url = [h for p, h in w.script.calls if p == "/pay"][call]["X-Saga-Callback-URL"]
    return token_hash(url.rsplit("/", 1)[1])


async def test_an_accepted_call_waits_holding_nothing_until_its_report() -> None:
    w = World(max_concurrency=1)
    w.script.answer("/pay", ACCEPTED)
    spec = definition(step("pay", callback={"timeout_seconds": 60}), step("ship"))
    saga = w.repo.start(spec)
    await w.settle(rounds=1, strict=False)
    assert w.statuses(saga) == [T.WAITING, T.PENDING]
    row = w.repo.rows[saga]
    assert row.owner is None and w.repo.live_slots("svc") == 0  # no worker, no slot
    assert row.due_at is not None
    assert abs((row.due_at - (w.clock.now + timedelta(seconds=60))).total_seconds()) < 1
    assert w.repo.report(_token(w), {"status": "succeeded", "response": {"id": 7}}) == "taken"
    assert w.repo.report(_token(w), {"status": "succeeded", "response": {"id": 7}}) == "repeated"
    await w.settle()
    assert w.state(saga).status is S.COMPLETED
    assert w.state(saga).steps[0].response == {"id": 7}
    assert w.script.paths() == ["/pay", "/ship"]
    assert w.repo.report(_token(w), {"status": "failed", "error": "x"}) == "different"


async def test_a_wait_without_a_report_times_out_and_retries_with_a_new_token() -> None:
    w = World()
    w.script.answer("/pay", ACCEPTED, ACCEPTED)
    saga = w.repo.start(definition(step("pay", callback={"timeout_seconds": 5})))
    await w.settle(rounds=7, strict=False)  # a wait times out; the retry waits
    assert w.state(saga).steps[0].attempts == 2
    first, second = _token(w, 0), _token(w, 1)
    assert first != second
    assert w.repo.report(first, {"status": "succeeded", "response": None}) == "closed"
    assert w.repo.report(second, {"status": "failed", "error": "declined"}) == "taken"
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths() == ["/pay", "/pay", "/pay/undo"]
    assert w.repo.rows[saga].error is not None
    assert w.repo.rows[saga].error["kind"] == ErrorKind.CALLBACK_FAILED.value


async def test_a_cancel_ends_a_wait_and_unwinds_the_waiting_step() -> None:
    w = World()
    w.script.answer("/pay", ACCEPTED)
    saga = w.repo.start(definition(step("hold"), step("pay", callback={"timeout_seconds": 600})))
    await w.settle(rounds=1, strict=False)
    assert w.statuses(saga) == [T.SUCCEEDED, T.WAITING]
    assert w.repo.cancel(saga)
    await w.settle()
    assert w.state(saga).status is S.COMPENSATED
    assert w.script.paths()[-2:] == ["/pay/undo", "/hold/undo"]
    assert w.repo.report(_token(w), {"status": "succeeded", "response": 1}) == "closed"
