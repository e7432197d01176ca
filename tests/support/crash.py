"""Helpers for the crash tests: orchestrator subprocesses, a participant that tracks every
call's lifetime, and the invariants a run must keep whatever moment a process died."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from examples.launcher import Launcher as BaseLauncher
from examples.launcher import Proc as Proc
from tests.support.servers import Participant, Reply

ADMIN_TOKEN = "crash-admin-token"
TERMINAL = ("completed", "compensated", "failed")
SERVICE = "shop"
OK_DEF = "crash_ok"  # a, b, c all succeed
BAD_DEF = "crash_bad"  # c answers 400: b and a are compensated
STEPS = ("a", "b", "c")


# --- the participant -------------------------------------------------------------------


@dataclass
class CallRecord:
    """One call as the participant lived it: from the first byte to the answer."""

    seq: int
    path: str
    key: str
    saga: str
    step: str
    attempt: str
    body: Any
    start: float
    end: float | None = None
    status: int | None = None

    @property
    def direction(self) -> str:
        return "compensation" if self.path.endswith("/undo") else "action"


class TrackingParticipant(Participant):
    """A Participant that also records when each call ended and how it was answered,
    notices two calls with one Idempotency-Key in flight at once, and can add a random
    delay per path (`jitter[path] = (low, high)` seconds)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.records: list[CallRecord] = []
        self.jitter: dict[str, tuple[float, float]] = {}
        self.open_keys: dict[str, int] = defaultdict(int)
        self.overlaps: list[tuple[str, int]] = []
        self.seed = seed
        self.rng = random.Random(seed)

    async def _handle(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        key = request.headers.get("idempotency-key", "")
        raw = await request.body()  # cached: the base handler reads it again
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(raw) if raw else None
        record = CallRecord(  # no await from here to the bookkeeping below
            seq=len(self.records),
            path=path,
            key=key,
            saga=request.headers.get("x-saga-id", ""),
            step=request.headers.get("x-saga-step", ""),
            attempt=request.headers.get("x-saga-attempt", ""),
            body=body,
            start=time.monotonic(),
        )
        self.records.append(record)
        if self.open_keys[key] > 0:
            self.overlaps.append((key, record.seq))
        self.open_keys[key] += 1
        try:
            low, high = self.jitter.get(path, (0.0, 0.0))
            if high > 0:
                await asyncio.sleep(self.rng.uniform(low, high))
            response = await super()._handle(request)
            record.status = response.status_code
            return response
        finally:
            record.end = time.monotonic()
            self.open_keys[key] -= 1


# --- orchestrator processes (the demo's launcher, with the tests' settings) -------------

TEST_DEFAULTS = {
    "SAGA_ADMIN_TOKEN": ADMIN_TOKEN,
    "SAGA_LOG_FORMAT": "console",
    "SAGA_LEASE_SECONDS": "2",
    "SAGA_POLL_INTERVAL": "0.2",
    "SAGA_SHUTDOWN_GRACE": "2",
}


class Launcher(BaseLauncher):
    """The shared launcher with short leases and the test admin token."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        super().__init__(db_url, workdir, TEST_DEFAULTS)


def client_for(proc: Proc) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proc.url, timeout=40, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )


# --- setup through the API -------------------------------------------------------------


def _step(name: str, body: Any, path: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "action": {"service": SERVICE, "path": path or f"/{name}", "body": body},
        "compensation": {
            "service": SERVICE,
            "path": f"/{name}/undo",
            "body": {"saga": "${saga.id}", "step": name},
        },
        # Fast retries, should a retryable outcome ever appear.
        "retry": {"max_attempts": 5, "initial_interval_seconds": 0.1, "jitter": False},
        "compensation_retry": {
            "max_attempts": 10,
            "initial_interval_seconds": 0.1,
            "jitter": False,
        },
    }


def definition(name: str) -> dict[str, Any]:
    """Three steps with compensations. b and c carry a's response, so a resumed saga
    must render them from the stored results; in BAD_DEF, c goes to /c/bad, which
    answers 400 (final, and "not applied")."""
    c_path = "/c/bad" if name == BAD_DEF else "/c"
    return {
        "name": name,
        "steps": [
            _step("a", "${input}"),
            _step("b", {"from_a": "${steps.a.response.id}"}),
            _step("c", {"from_a": "${steps.a.response.id}", "n": "${input.n}"}, c_path),
        ],
    }


async def register(client: httpx.AsyncClient, participant: TrackingParticipant) -> None:
    r = await client.put(f"/v1/services/{SERVICE}", json={"base_url": participant.url})
    assert r.status_code in (200, 201), r.text
    for name in (OK_DEF, BAD_DEF):
        r = await client.post("/v1/definitions", json=definition(name))
        assert r.status_code in (200, 201), r.text
    participant.always("/c/bad", Reply(400, {"error": "out of stock"}))


async def start_sagas(client: httpx.AsyncClient, count: int, bad_every: int = 2) -> dict[str, str]:
    """Start `count` sagas; every `bad_every`-th uses the failing definition. id -> definition."""
    sagas: dict[str, str] = {}
    for n in range(count):
        definition = BAD_DEF if bad_every and n % bad_every == 1 else OK_DEF
        r = await client.post(
            "/v1/sagas",
            json={"definition": definition, "input": {"n": n, "bad": definition == BAD_DEF}},
            headers={"Idempotency-Key": f"crash-{n}"},
        )
        assert r.status_code == 201, r.text
        sagas[r.json()["id"]] = definition
    return sagas


async def wait_all_terminal(
    client: httpx.AsyncClient, ids: Iterable[str], seconds: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + seconds
    done: dict[str, dict[str, Any]] = {}
    for saga_id in ids:
        while True:
            remaining = deadline - time.monotonic()
            r = await client.get(
                f"/v1/sagas/{saga_id}", params={"wait_seconds": max(0.1, min(remaining, 10))}
            )
            assert r.status_code == 200, r.text
            saga = r.json()
            if saga["status"] in TERMINAL:
                done[saga_id] = saga
                break
            if remaining <= 0:
                steps = [(s["name"], s["status"], s["attempts"]) for s in saga["steps"]]
                raise AssertionError(
                    f"saga {saga_id} still {saga['status']} after {seconds}s: {steps}"
                )
    return done


async def events_of(client: httpx.AsyncClient, saga_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        r = await client.get(f"/v1/sagas/{saga_id}/events", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items


# --- invariants ------------------------------------------------------------------------


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)


def _abandoned(events: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(step, direction) pairs with an attempt cut off by a crash: closed as `abandoned`
    by the worker that took over, or (while nobody has taken over yet) still open."""
    started: set[tuple[str, str, int]] = set()
    finished: set[tuple[str, str, int]] = set()
    abandoned: set[tuple[str, str]] = set()
    for e in events:
        k = (e["step"], e["direction"], e["attempt"])
        if e["type"] == "attempt_started":
            started.add(k)
        elif e["type"] == "attempt_finished":
            finished.add(k)
            if e["outcome"] == "abandoned":
                abandoned.add((e["step"], e["direction"]))
    return abandoned | {(s, d) for s, d, _ in started - finished}


def check_run(
    sagas: dict[str, str],
    final: dict[str, dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    participant: TrackingParticipant,
    may_abandon: Callable[[str | None], bool],
    check_overlap: bool = True,
) -> list[str]:
    """Every invariant of a crashed-and-recovered run; a list of what is broken."""
    v = Verdict()
    by_saga: dict[str, list[CallRecord]] = defaultdict(list)
    key_owner: dict[str, set[str]] = defaultdict(set)
    for rec in participant.records:
        by_saga[rec.saga].append(rec)
        key_owner[rec.key].add(rec.saga)

    v.check(set(by_saga) <= set(sagas), f"calls for unknown sagas: {set(by_saga) - set(sagas)}")
    for key, owners in key_owner.items():
        v.check(len(owners) == 1, f"key {key} used by several sagas: {owners}")
    if check_overlap:
        v.check(
            not participant.overlaps,
            f"calls with one Idempotency-Key overlapped in flight: {participant.overlaps}",
        )

    for saga_id, definition in sagas.items():
        saga = final[saga_id]
        events = histories[saga_id]
        calls = sorted(by_saga.get(saga_id, []), key=lambda r: r.seq)
        where = f"saga {saga_id} ({definition})"
        abandoned = _abandoned(events)
        _check_calls(v, where, saga_id, calls, definition, abandoned)
        _check_status(v, where, saga, definition, abandoned)
        _check_history(v, where, saga, events, may_abandon)
        _check_events_match_calls(v, where, events, calls)
    return v.problems


def _check_calls(
    v: Verdict,
    where: str,
    saga_id: str,
    calls: list[CallRecord],
    definition: str,
    abandoned: set[tuple[str, str]],
) -> None:
    # One key per (step, direction), and it is the contract's key.
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in calls:
        keys[(c.step, c.direction)].add(c.key)
        v.check(c.path.strip("/").split("/")[0] == c.step, f"{where}: {c.path} sent as {c.step}")
        if c.direction == "action" and c.step in ("b", "c"):
            want = f"/a-{saga_id}:a:action"  # the participant's answer to a, as stored
            v.check(
                isinstance(c.body, dict) and c.body.get("from_a") == want,
                f"{where}: {c.step} rendered with {c.body!r}, not a's stored response",
            )
    for (step, direction), ks in keys.items():
        v.check(
            ks == {f"{saga_id}:{step}:{direction}"},
            f"{where}: {step}/{direction} was called with keys {ks}",
        )

    # Effects: a deduping participant applies each key once, when it answered 2xx.
    applied = {(c.step, c.direction) for c in calls if c.status is not None and c.status < 300}
    actions = {s for s, d in applied if d == "action"}
    undone = {s for s, d in applied if d == "compensation"}
    if definition == OK_DEF:
        v.check(actions == {"a", "b", "c"}, f"{where}: actions applied {sorted(actions)}")
        v.check(not undone, f"{where}: a completed saga was compensated: {sorted(undone)}")
    else:
        v.check(actions == {"a", "b"}, f"{where}: actions applied {sorted(actions)}")
        # Every applied action is undone; an action is undone without being applied only
        # when its outcome was unknown (an attempt was abandoned by a dying process).
        v.check(undone >= actions, f"{where}: applied {actions} but undid only {undone}")
        for step in undone - actions:
            v.check(
                (step, "action") in abandoned,
                f"{where}: {step} compensated though its action surely did not happen",
            )

    # Every attempt of one key carries a new X-Saga-Attempt number.
    by_key: dict[str, list[CallRecord]] = defaultdict(list)
    for c in calls:
        by_key[c.key].append(c)
    for key, group in by_key.items():
        numbers = [int(c.attempt) for c in group if c.attempt.isdigit()]
        v.check(
            len(numbers) == len(group) and numbers == sorted(set(numbers)),
            f"{where}: {key} attempts numbered {[c.attempt for c in group]}",
        )

    # Forward steps in order: step N+1 starts only after step N answered 2xx.
    def first_start(step: str, direction: str) -> float | None:
        starts = [c.start for c in calls if c.step == step and c.direction == direction]
        return min(starts) if starts else None

    def first_ok_end(step: str, direction: str) -> float | None:
        ends = [
            c.end
            for c in calls
            if c.step == step
            and c.direction == direction
            and c.status is not None
            and c.status < 300
            and c.end is not None
        ]
        return min(ends) if ends else None

    for prev, nxt in itertools.pairwise(STEPS):
        start = first_start(nxt, "action")
        if start is None:
            continue
        done = first_ok_end(prev, "action")
        v.check(
            done is not None and start >= done,
            f"{where}: {nxt} started at {start:.3f} before {prev} succeeded ({done})",
        )
    # Compensations after the last action, in reverse order.
    comp_starts = [c.start for c in calls if c.direction == "compensation"]
    action_ends = [c.end or c.start for c in calls if c.direction == "action"]
    if comp_starts and action_ends:
        v.check(
            min(comp_starts) >= max(action_ends),
            f"{where}: a compensation started before the forward calls ended",
        )
    for later, earlier in (("c", "b"), ("b", "a")):
        start = first_start(earlier, "compensation")
        if start is None:
            continue
        if first_start(later, "compensation") is not None:
            done = first_ok_end(later, "compensation")
            v.check(
                done is not None and start >= done,
                f"{where}: undo of {earlier} started before undo of {later} succeeded",
            )


def _check_status(
    v: Verdict,
    where: str,
    saga: dict[str, Any],
    definition: str,
    abandoned: set[tuple[str, str]],
) -> None:
    steps = {s["name"]: s for s in saga["steps"]}
    statuses = {name: s["status"] for name, s in steps.items()}
    if definition == OK_DEF:
        v.check(saga["status"] == "completed", f"{where}: ended {saga['status']}")
        v.check(
            statuses == {"a": "succeeded", "b": "succeeded", "c": "succeeded"},
            f"{where}: steps {statuses}",
        )
        v.check(saga["error"] is None, f"{where}: error {saga['error']}")
    else:
        v.check(saga["status"] == "compensated", f"{where}: ended {saga['status']}")
        c_ok = ("compensated",) if ("c", "action") in abandoned else ()
        v.check(
            statuses["a"] == "compensated"
            and statuses["b"] == "compensated"
            and statuses["c"] in ("failed", *c_ok),
            f"{where}: steps {statuses} (abandoned attempts: {sorted(abandoned)})",
        )
        err = saga["error"] or {}
        v.check(
            err.get("step") == "c" and err.get("kind") == "http_status",
            f"{where}: error {saga['error']}",
        )
    v.check(saga["finished_at"] is not None, f"{where}: no finished_at")


ALLOWED_EVENTS = {
    "saga_started",
    "attempt_started",
    "attempt_finished",
    "compensation_started",
    "saga_completed",
    "saga_compensated",
    "saga_failed",
}


def _check_history(
    v: Verdict,
    where: str,
    saga: dict[str, Any],
    events: list[dict[str, Any]],
    may_abandon: Callable[[str | None], bool],
) -> None:
    types = [e["type"] for e in events]
    v.check(bool(events) and types[0] == "saga_started", f"{where}: history starts {types[:1]}")
    v.check(
        set(types) <= ALLOWED_EVENTS, f"{where}: unexpected events {set(types) - ALLOWED_EVENTS}"
    )
    terminal = [t for t in types if t in ("saga_completed", "saga_compensated", "saga_failed")]
    v.check(
        terminal == [f"saga_{saga['status']}"] and types[-1] == terminal[0],
        f"{where}: terminal events {terminal}, last {types[-1:]}",
    )
    v.check(
        types.count("compensation_started") == (1 if saga["status"] == "compensated" else 0),
        f"{where}: {types.count('compensation_started')} compensation_started events",
    )
    ids = [e["id"] for e in events]
    v.check(ids == sorted(ids), f"{where}: events out of order")

    order = {name: i for i, name in enumerate(STEPS)}
    next_attempt: dict[tuple[str, str], int] = defaultdict(lambda: 1)
    open_attempt: dict[str, Any] | None = None
    succeeded: set[str] = set()
    unwinding = False
    last_comp_idx = len(STEPS)
    workers: list[str] = []
    for e in events:
        if e["worker"] and (not workers or workers[-1] != e["worker"]):
            v.check(
                e["worker"] not in workers,
                f"{where}: worker {e['worker']} wrote again after another took over: "
                f"{[*workers, e['worker']]}",
            )
            workers.append(e["worker"])
        kind = e["type"]
        if kind == "attempt_started":
            k = (e["step"], e["direction"])
            v.check(
                e["attempt"] == next_attempt[k],
                f"{where}: {k} attempt {e['attempt']} started, expected {next_attempt[k]}",
            )
            next_attempt[k] = e["attempt"] + 1
            if open_attempt is not None:
                # The previous attempt was abandoned: only a process that died (or was
                # told to stop) may leave one, and someone else picks the saga up.
                v.check(
                    may_abandon(open_attempt["worker"]),
                    f"{where}: attempt {open_attempt['step']}/{open_attempt['attempt']} by "
                    f"{open_attempt['worker']} never finished, yet that process lived on",
                )
                v.check(
                    open_attempt["worker"] != e["worker"],
                    f"{where}: {e['worker']} abandoned an attempt and started another",
                )
            open_attempt = e
            if e["direction"] == "action":
                v.check(not unwinding, f"{where}: action {e['step']} started while unwinding")
                idx = order[e["step"]]
                v.check(
                    all(s in succeeded for s in STEPS[:idx]),
                    f"{where}: {e['step']} started before earlier steps succeeded",
                )
            else:
                v.check(unwinding, f"{where}: compensation of {e['step']} before unwinding")
                idx = order[e["step"]]
                v.check(idx <= last_comp_idx, f"{where}: compensations out of reverse order")
                last_comp_idx = idx
        elif kind == "attempt_finished":
            same_attempt = open_attempt is not None and (
                open_attempt["step"],
                open_attempt["direction"],
                open_attempt["attempt"],
            ) == (e["step"], e["direction"], e["attempt"])
            if e["outcome"] == "abandoned":
                # Closed by the worker that took over, for a process that died or stopped.
                v.check(
                    same_attempt
                    and open_attempt is not None
                    and open_attempt["worker"] != e["worker"]
                    and may_abandon(open_attempt["worker"]),
                    f"{where}: {e['step']}/{e['direction']}/{e['attempt']} marked abandoned "
                    f"by {e['worker']} though its worker lived on or it was not open",
                )
            else:
                v.check(
                    same_attempt
                    and open_attempt is not None
                    and open_attempt["worker"] == e["worker"],
                    f"{where}: {e['step']}/{e['direction']}/{e['attempt']} finished by "
                    f"{e['worker']} without its start",
                )
            open_attempt = None
            if e["direction"] == "action" and e["outcome"] == "succeeded":
                succeeded.add(e["step"])
        elif kind == "compensation_started":
            v.check(not unwinding, f"{where}: compensation started twice")
            unwinding = True
        elif kind.startswith("saga_") and kind != "saga_started":
            v.check(open_attempt is None, f"{where}: finished with an attempt open")
    for step in saga["steps"]:
        counted = (
            next_attempt[(step["name"], "action")] - 1,
            next_attempt[(step["name"], "compensation")] - 1,
        )
        v.check(
            counted == (step["attempts"], step["compensation_attempts"]),
            f"{where}: step {step['name']} counts {step['attempts']}/"
            f"{step['compensation_attempts']} attempts, history shows {counted}",
        )


def _check_events_match_calls(
    v: Verdict, where: str, events: list[dict[str, Any]], calls: list[CallRecord]
) -> None:
    """Each finished attempt was a call the participant answered with that status."""
    answered = {
        (c.step, c.direction, int(c.attempt)): c.status for c in calls if c.attempt.isdigit()
    }
    started = {
        (e["step"], e["direction"], e["attempt"]) for e in events if e["type"] == "attempt_started"
    }
    for c in calls:
        key = (c.step, c.direction, int(c.attempt) if c.attempt.isdigit() else -1)
        v.check(key in started, f"{where}: call {key} without an attempt_started event")
    for e in events:
        if e["type"] != "attempt_finished" or e["outcome"] == "abandoned":
            continue
        key = (e["step"], e["direction"], e["attempt"])
        v.check(
            key in answered and answered[key] == e["status_code"],
            f"{where}: event {key} says {e['status_code']}, participant answered "
            f"{answered.get(key)}",
        )


def summary(
    histories: dict[str, list[dict[str, Any]]], participant: TrackingParticipant
) -> dict[str, Any]:
    """What a run went through, to show that the crash hit something (printed by tests)."""
    per_key: dict[str, int] = defaultdict(int)
    for rec in participant.records:
        per_key[rec.key] += 1
    workers: dict[str, set[str]] = defaultdict(set)
    abandoned = 0
    for saga_id, events in histories.items():
        for e in events:
            if e["worker"]:
                workers[e["worker"]].add(saga_id)
        abandoned += len(_abandoned(events))
    handed_over = sum(
        1 for events in histories.values() if len({e["worker"] for e in events} - {None}) > 1
    )
    return {
        "calls": len(participant.records),
        "keys": len(per_key),
        "keys_called_again": sum(1 for n in per_key.values() if n > 1),
        "abandoned_attempts": abandoned,
        "sagas_handed_over": handed_over,
        "sagas_per_worker": {w.split(":", 1)[1]: len(s) for w, s in workers.items()},
    }


async def wait_for_calls(participant: TrackingParticipant, count: int, seconds: float) -> None:
    """Until the participant has seen `count` calls in all, or `seconds` passed."""
    deadline = time.monotonic() + seconds
    while True:
        if len(participant.records) >= count or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.01)
