"""Crash safety: orchestrator processes die (failpoints, SIGKILL at random, one of two
workers killed, SIGTERM with a slow call) and every saga still ends where it should,
with each side effect applied once and a history that makes sense.

The orchestrator runs as real subprocesses (`python -m app serve|api|worker`) against a
fresh database; the participant runs in the test process and records every call. The
lease is 2 s, so a saga held by a dead process resumes about 2 s after the death.
Random moments come from a seed shown on failure; CRASH_SEED=<n> replays one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.crash import (
    BAD_DEF,
    OK_DEF,
    Launcher,
    Proc,
    TrackingParticipant,
    check_run,
    client_for,
    events_of,
    register,
    start_sagas,
    summary,
    wait_all_terminal,
    wait_for_calls,
)
from tests.support.servers import Participant, Reply, serve

pytestmark = pytest.mark.slow

FULL = os.environ.get("SAGA_CHAOS_FULL", "").strip().lower() in ("1", "true", "yes")
SAGAS = 200 if FULL else 30  # per run: `tasks.py chaos` runs the full size
SETTLE = 400 if FULL else 60  # seconds for every saga to become terminal after the crash
FIGURES = Path(__file__).resolve().parents[2] / "test-artifacts" / "chaos" / "figures.jsonl"
ALL_PATHS = ("/a", "/b", "/c", "/c/bad", "/a/undo", "/b/undo", "/c/undo")


@pytest.fixture
async def participant() -> AsyncIterator[TrackingParticipant]:
    """The participant, with call lifetimes and overlaps tracked (see tests.support.crash)."""
    p = TrackingParticipant(seed=int(os.environ.get("CRASH_SEED") or random.randrange(1 << 30)))
    async with serve(p.app) as base:
        p.url = base
        yield p


@pytest.fixture
def launcher(db_url: str, tmp_path: Path, participant: TrackingParticipant) -> Iterator[Launcher]:
    """Orchestrator subprocesses; all killed at the end (before the participant and the
    database go away). Their output is printed at teardown, which pytest shows only when
    the test failed."""
    procs = Launcher(db_url, tmp_path)
    try:
        yield procs
    finally:
        procs.close()
        print(procs.dump())


async def _collect(
    proc: Proc, sagas: dict[str, str], seconds: float
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    async with client_for(proc) as client:
        final = await wait_all_terminal(client, sagas, seconds)
        histories = {saga_id: await events_of(client, saga_id) for saga_id in sagas}
    return final, histories


def _touched_by(histories: dict[str, list[dict[str, Any]]], proc: Proc) -> set[str]:
    return {sid for sid, events in histories.items() if any(proc.owns(e["worker"]) for e in events)}


def _record(**values: Any) -> None:
    """Append this run's headline figures for docs/reliability.md."""
    line = {"mode": "full" if FULL else "quick", **values}
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps(line, default=str) + "\n")


def _resume_seconds(
    histories: dict[str, list[dict[str, Any]]], proc: Proc, started: dt.datetime
) -> float | None:
    """From starting `proc` to the first event it wrote (it waits for expired leases)."""
    times = [e["at"] for events in histories.values() for e in events if proc.owns(e["worker"])]
    if not times:
        return None
    first = min(dt.datetime.fromisoformat(t) for t in times)
    return round((first - started).total_seconds(), 3)


def _report(problems: list[str], context: str) -> str:
    """The failure message: the first violations (process output follows at teardown)."""
    shown = "\n".join(problems[:40])
    more = f"\n… and {len(problems) - 40} more" if len(problems) > 40 else ""
    return f"{context}: {len(problems)} invariant violations\n{shown}{more}"


# --- 1. deterministic failpoints -------------------------------------------------------

FAILPOINTS = [
    # name, which hit kills the process (6 sagas run at once in the doomed worker)
    ("before_send", 20),
    ("after_send_before_commit", 20),
    ("after_commit", 20),
    ("mid_compensation", 6),
    ("while_claiming", 8),
]


@pytest.mark.parametrize(("failpoint", "hit"), FAILPOINTS, ids=[f for f, _ in FAILPOINTS])
async def test_failpoint_crash_then_resume(
    failpoint: str, hit: int, launcher: Launcher, participant: TrackingParticipant
) -> None:
    participant.jitter = dict.fromkeys(ALL_PATHS, (0.0, 0.05))
    api = await launcher.start_ready("api", "api")
    async with client_for(api) as client:
        await register(client, participant)
        sagas = await start_sagas(client, SAGAS)
    assert sum(d == BAD_DEF for d in sagas.values()) == SAGAS // 2

    doomed = launcher.start(
        "worker", "doomed", SAGA_FAILPOINT=f"{failpoint}:{hit}", SAGA_WORKER_CONCURRENCY=6
    )
    rc = await doomed.wait_exit(60)
    assert rc == -signal.SIGKILL, f"doomed worker exited with {rc}\n{doomed.output()}"
    assert f"failpoint {failpoint}: killing process" in doomed.output()

    restarted_at = dt.datetime.now(dt.UTC)
    fresh = launcher.start("worker", "fresh")
    final, histories = await _collect(api, sagas, SETTLE)

    problems = check_run(sagas, final, histories, participant, may_abandon=doomed.owns)
    print(failpoint, summary(histories, participant))
    _record(
        test=f"crash matrix: {failpoint}",
        sagas=len(sagas),
        kills=1,
        terminal=sum(s["status"] in ("completed", "compensated", "failed") for s in final.values()),
        invariant_violations=len(problems),
        duplicate_effects=sum("twice" in p or "duplicate" in p for p in problems),
        resume_seconds=_resume_seconds(histories, fresh, restarted_at),
        summary=summary(histories, participant),
    )
    assert not problems, _report(problems, f"failpoint {failpoint}:{hit}")
    # The crash really happened mid-run: the fresh worker took over started sagas.
    by_doomed, by_fresh = _touched_by(histories, doomed), _touched_by(histories, fresh)
    assert by_doomed & by_fresh, f"no saga was handed over (doomed {len(by_doomed)})"
    assert by_fresh, "the fresh worker did nothing"


async def test_abandoned_attempt_gets_an_outcome(
    launcher: Launcher, participant: TrackingParticipant
) -> None:
    """An attempt cut short by a crash is closed in the history with outcome `abandoned`
    (AttemptOutcome.ABANDONED: "the process died or lost its lease mid-call") before the
    next attempt starts; the contract promises every attempt's outcome in /events, and
    the dashboard's timeline otherwise draws it as in flight forever."""
    api = await launcher.start_ready("api", "api")
    async with client_for(api) as client:
        await register(client, participant)
        sagas = await start_sagas(client, 2, bad_every=0)
    doomed = launcher.start(
        "worker", "doomed", SAGA_FAILPOINT="after_send_before_commit:1", SAGA_WORKER_CONCURRENCY=1
    )
    assert await doomed.wait_exit(60) == -signal.SIGKILL, doomed.output()
    launcher.start("worker", "fresh")
    final, histories = await _collect(api, sagas, 60)
    problems = check_run(sagas, final, histories, participant, may_abandon=doomed.owns)
    assert not problems, _report(problems, "one attempt abandoned")

    unclosed = []
    for saga_id, events in histories.items():
        for i, e in enumerate(events):
            if e["type"] != "attempt_started":
                continue
            key = (e["step"], e["direction"], e["attempt"])
            later = events[i + 1 :]
            closing = next(
                (
                    x
                    for x in later
                    if (x["step"], x["direction"], x["attempt"]) == key
                    and x["outcome"] not in (None, "started")
                ),
                None,
            )
            next_start = next((x for x in later if x["type"] == "attempt_started"), None)
            if closing is None:
                unclosed.append(f"{saga_id} {key} by {e['worker']}: no outcome ever")
            elif next_start is not None and closing["id"] > next_start["id"]:
                unclosed.append(f"{saga_id} {key}: closed only after the next attempt started")
            elif doomed.owns(e["worker"]) and closing["outcome"] != "abandoned":
                unclosed.append(f"{saga_id} {key}: outcome {closing['outcome']}, not abandoned")
    assert not unclosed, "attempts without an outcome in /events:\n" + "\n".join(unclosed)


# --- 2. SIGKILL at a random moment -----------------------------------------------------


async def test_sigkill_at_random_moments(
    launcher: Launcher, participant: TrackingParticipant
) -> None:
    """`serve` is killed at a random moment of the run, then the process that resumes
    is killed too, after a random number of calls of its recovery; a third one finishes."""
    seed = participant.seed  # also drives the participant's delays
    rng = random.Random(seed)
    participant.jitter = dict.fromkeys(ALL_PATHS, (0.05, 0.2))
    first = await launcher.start_ready("serve", "serve1", SAGA_WORKER_CONCURRENCY=8)
    async with client_for(first) as client:
        await register(client, participant)
        sagas = await start_sagas(client, SAGAS)
    # 24 sagas, 8 at a time, 3-5 calls of 0.05-0.2 s each: the run lasts about 2 s.
    moment = rng.uniform(0.0, 1.5)
    await asyncio.sleep(moment)
    first.kill()
    await first.wait_exit(10)
    calls = [len(participant.records)]

    # The second process resumes the held sagas once their 2 s leases expire; it is killed
    # after a random number of its own calls (its timing varies too much with the load).
    second = launcher.start("serve", "serve2")
    target = calls[0] + rng.randint(1, max(1, (SAGAS * 4 - calls[0]) // 2))
    await wait_for_calls(participant, target, 30)
    second.kill()
    await second.wait_exit(10)
    calls.append(len(participant.records))

    third = await launcher.start_ready("serve", "serve3")
    final, histories = await _collect(third, sagas, 60)

    dead = (first, second)
    problems = check_run(
        sagas, final, histories, participant, may_abandon=lambda w: any(p.owns(w) for p in dead)
    )
    context = f"seed {seed}, first SIGKILL at {moment:.2f}s; calls made by the kills: {calls}"
    print(context, summary(histories, participant))
    assert not problems, _report(problems, context)


# --- 3. two workers, one killed ----------------------------------------------------------


@pytest.mark.parametrize("victim", ["worker", "serve"])
async def test_two_processes_one_killed(
    victim: str, launcher: Launcher, participant: TrackingParticipant
) -> None:
    seed = participant.seed  # also drives the participant's delays
    rng = random.Random(seed)
    participant.jitter = dict.fromkeys(ALL_PATHS, (0.05, 0.2))
    server = await launcher.start_ready("serve", "serve", SAGA_WORKER_CONCURRENCY=4)
    worker = await launcher.start_ready("worker", "worker", SAGA_WORKER_CONCURRENCY=4)
    async with client_for(server) as client:
        await register(client, participant)
        sagas = await start_sagas(client, SAGAS)
    moment = rng.uniform(0.3, 1.5)
    await asyncio.sleep(moment)
    killed, survivor = (worker, server) if victim == "worker" else (server, worker)
    killed.kill()
    await killed.wait_exit(10)

    reader = server if victim == "worker" else await launcher.start_ready("api", "api")
    final, histories = await _collect(reader, sagas, 60)

    problems = check_run(sagas, final, histories, participant, may_abandon=killed.owns)
    print(f"seed {seed} kill {victim} at {moment:.2f}s", summary(histories, participant))
    context = f"seed {seed}, {victim} killed {moment:.2f}s after the sagas started"
    assert not problems, _report(problems, context)
    assert _touched_by(histories, killed), f"{context}: the killed process had done nothing"
    assert _touched_by(histories, survivor), f"{context}: the survivor did nothing"


async def test_call_longer_than_lease_is_not_taken_over(
    launcher: Launcher, participant: TrackingParticipant
) -> None:
    """The other half of taking over: while the holder lives, it renews its lease during
    a call that outlasts the lease, so a second worker never sends the call again."""
    count = 4
    participant.script("/b", *[Reply(delay=3.5) for _ in range(count)])  # lease is 2 s
    server = await launcher.start_ready("serve", "serve", SAGA_WORKER_CONCURRENCY=2)
    worker = await launcher.start_ready("worker", "worker", SAGA_WORKER_CONCURRENCY=2)
    async with client_for(server) as client:
        await register(client, participant)
        sagas = await start_sagas(client, count, bad_every=0)
    final, histories = await _collect(server, sagas, 60)

    problems = check_run(sagas, final, histories, participant, may_abandon=lambda _w: False)
    print("long calls", summary(histories, participant))
    assert not problems, _report(problems, "calls longer than the lease, nobody killed")
    per_key: dict[str, int] = {}
    for r in participant.records:
        per_key[r.key] = per_key.get(r.key, 0) + 1
    assert all(n == 1 for n in per_key.values()), {k: n for k, n in per_key.items() if n > 1}
    assert _touched_by(histories, server) and _touched_by(histories, worker)


# --- 4. SIGTERM with a slow call in flight -----------------------------------------------


@pytest.mark.parametrize(
    ("call_seconds", "grace"),
    [(1.5, 4.0), (3.0, 1.0)],
    ids=["call-finishes-within-grace", "call-outlasts-grace"],
)
async def test_sigterm_drains_then_another_process_finishes(
    call_seconds: float, grace: float, launcher: Launcher, participant: TrackingParticipant
) -> None:
    count = 4
    participant.script("/b", *[Reply(delay=call_seconds) for _ in range(count)])
    api = await launcher.start_ready("api", "api")
    async with client_for(api) as client:
        await register(client, participant)
        sagas = await start_sagas(client, count, bad_every=0)
    assert set(sagas.values()) == {OK_DEF}

    leaving = await launcher.start_ready("worker", "leaving", SAGA_SHUTDOWN_GRACE=grace)
    deadline = time.monotonic() + 30
    while len([r for r in participant.records if r.path == "/b"]) < count:
        assert time.monotonic() < deadline, f"b was never called\n{leaving.output()}"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # all four slow calls in flight
    assert all(r.end is None for r in participant.records if r.path == "/b")

    leaving.terminate()
    other = launcher.start("worker", "other")
    rc = await leaving.wait_exit(grace + 10)
    assert leaving.signalled_at is not None
    took = time.monotonic() - leaving.signalled_at
    assert rc == 0, f"SIGTERM exit code {rc}\n{leaving.output()}"
    # The drain waits at most the grace period; allow a little for exiting on a busy box.
    assert took <= grace + 2.0, f"exited {took:.2f}s after SIGTERM (grace {grace}s)"

    final, histories = await _collect(api, sagas, 60)
    outlasted = call_seconds > grace
    # A call cancelled at the end of the grace period may still be running at the
    # participant when the released saga is picked up again at once.
    problems = check_run(
        sagas,
        final,
        histories,
        participant,
        may_abandon=leaving.owns,
        check_overlap=not outlasted,
    )
    print(f"SIGTERM exit after {took:.2f}s", summary(histories, participant))
    assert not problems, _report(problems, f"SIGTERM, call {call_seconds}s, grace {grace}s")
    b_calls: dict[str, int] = {}
    for r in participant.records:
        if r.path == "/b":
            b_calls[r.saga] = b_calls.get(r.saga, 0) + 1
    if outlasted:
        # The cancelled calls were handed back and made again by the other process.
        assert _touched_by(histories, other) == set(sagas)
        assert all(n == 2 for n in b_calls.values()), b_calls
    else:
        # The in-flight calls finished and were recorded: none was made twice.
        assert all(n == 1 for n in b_calls.values()), b_calls


# --- callback steps -----------------------------------------------------------------------


async def test_kill_while_waiting_for_callbacks_then_report_to_a_new_process(
    launcher: Launcher, participant: TrackingParticipant
) -> None:
    """A worker is killed with SIGKILL right after a callback step's wait was committed,
    with other sagas waiting and some calls in flight, and the API process with it; every
    report then goes to a new `serve` process, and no wait and no report is lost: each
    saga completes with its report, each action ran once per attempt under one key, and
    a wait committed before the kill is never called again."""
    waits = Participant()
    waits.always("/pay", Reply(202, {"accepted": True}))
    async with serve(waits.app) as base:
        api = await launcher.start_ready("api", "api")
        async with client_for(api) as client:
            r = await client.put("/v1/services/pay", json={"base_url": base})
            assert r.status_code in (200, 201), r.text
            pay = {"service": "pay", "path": "/pay", "body": {"saga": "${saga.id}"}}
            ship = {"service": "pay", "path": "/ship", "body": "${steps.pay.response}"}
            r = await client.post(
                "/v1/definitions",
                json={
                    "name": "async_pay",
                    "steps": [
                        {"name": "pay", "action": pay, "callback": {"timeout_seconds": 300}},
                        {"name": "ship", "action": ship},
                    ],
                },
            )
            assert r.status_code in (200, 201), r.text
            ids = []
            for n in range(8):
                r = await client.post(
                    "/v1/sagas", json={"definition": "async_pay", "input": {"n": n}}
                )
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
        doomed = launcher.start(
            "worker", "doomed", SAGA_FAILPOINT="while_waiting:4", SAGA_WORKER_CONCURRENCY=8
        )
        assert await doomed.wait_exit(60) == -signal.SIGKILL, doomed.output()
        api.kill()
        assert "failpoint while_waiting: killing process" in doomed.output()
        calls_at_kill = {c.headers["x-saga-id"] for c in waits.to("/pay")}

        fresh = await launcher.start_ready("serve", "fresh")
        async with client_for(fresh) as client:

            async def all_waiting() -> bool:
                for saga_id in ids:
                    saga = (await client.get(f"/v1/sagas/{saga_id}")).json()
                    if saga["steps"][0]["status"] != "waiting":
                        return False
                return True

            deadline = time.monotonic() + 60
            while not await all_waiting():
                assert time.monotonic() < deadline, "not every saga came to wait"
                await asyncio.sleep(0.2)
            for saga_id in ids:
                latest = [c for c in waits.to("/pay") if c.headers["x-saga-id"] == saga_id][-1]
                token = latest.headers["x-saga-callback-url"].rsplit("/", 1)[1]
                r = await client.post(
                    f"/v1/callbacks/{token}",
                    json={"status": "succeeded", "response": {"paid": saga_id}},
                )
                assert r.status_code == 200, r.text
            final = await wait_all_terminal(client, dict.fromkeys(ids, "async_pay"), 60)
    for saga_id in ids:
        assert final[saga_id]["status"] == "completed", final[saga_id]
        pays = [c for c in waits.to("/pay") if c.headers["x-saga-id"] == saga_id]
        assert {c.headers["idempotency-key"] for c in pays} == {f"{saga_id}:pay:action"}
        assert len(pays) <= 2, pays  # at most the attempt a crash cut off, then one more
        assert [c.body for c in waits.to("/ship") if c.headers["x-saga-id"] == saga_id] == [
            {"paid": saga_id}
        ]
    # At least the four waits committed before the kill were never called again.
    once = [s for s in ids if sum(c.headers["x-saga-id"] == s for c in waits.to("/pay")) == 1]
    assert len(once) >= 4 and calls_at_kill, (once, calls_at_kill)


# --- completion notifications ----------------------------------------------------------


async def test_notification_redelivered_after_a_crash_between_commit_and_delivery(
    launcher: Launcher, participant: TrackingParticipant
) -> None:
    """The worker whose commit made the saga terminal is killed before it delivers the
    notification: another worker delivers it, with the same Idempotency-Key, and the
    saga's status is what the commit wrote."""
    receiver = Participant()
    async with serve(receiver.app) as hooks_url:
        api = await launcher.start_ready("api", "api")
        async with client_for(api) as client:
            await register(client, participant)
            notify = {"url": f"{hooks_url}/hooks", "retry": {"initial_interval_seconds": 0.1}}
            r = await client.post(
                "/v1/sagas",
                json={"definition": OK_DEF, "input": {"n": 1}, "notify": notify},
                headers={"Idempotency-Key": "crash-notify"},
            )
            assert r.status_code == 201, r.text
            saga_id = r.json()["id"]
            doomed = launcher.start(
                "worker", "doomed", SAGA_FAILPOINT="before_notify", SAGA_WORKER_CONCURRENCY=1
            )
            assert await doomed.wait_exit(60) == -signal.SIGKILL, doomed.output()
            assert "failpoint before_notify: killing process" in doomed.output()
            r = await client.get(f"/v1/sagas/{saga_id}")
            assert r.json()["status"] == "completed"
            assert r.json()["notification"] == {"status": "pending", "attempts": 0}
            assert receiver.calls == []

            launcher.start("worker", "fresh")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                saga = (await client.get(f"/v1/sagas/{saga_id}")).json()
                if saga["notification"]["status"] != "pending":
                    break
                await asyncio.sleep(0.1)
        assert saga["status"] == "completed"
        assert saga["notification"] == {"status": "delivered", "attempts": 1}, saga
        (delivery,) = receiver.to("/hooks")
        assert delivery.headers["idempotency-key"] == f"{saga_id}:notify"
        assert delivery.headers["x-saga-status"] == "completed"
        assert delivery.body["id"] == saga_id and delivery.body["status"] == "completed"
