"""Replicas: three executor processes share one database; one is frozen with SIGSTOP
for twice the lease while it holds sagas mid-call, then thawed.

The other two take its sagas over once the leases expire. When the frozen one wakes,
every write it tries for those sagas is refused by the (owner, epoch) fence, and no two
attempts of one step are ever in flight at once. Every saga then ends where it should,
with each effect applied once (the invariants of tests.support.crash). Quick: 100
sagas; full (SAGA_CHAOS_FULL=1): 1,000.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.chaos.conftest import Record, Scale
from tests.chaos.helpers import collect, db_now, parse_at, quantiles, query, report, start_many
from tests.support.crash import (
    Launcher,
    Proc,
    TrackingParticipant,
    check_run,
    client_for,
    register,
    summary,
)

pytestmark = pytest.mark.slow

LEASE = 2.0
PATHS = ("/a", "/b", "/c", "/c/bad", "/a/undo", "/b/undo", "/c/undo")


def _held_by(db_url: str, proc: Proc) -> dict[str, datetime]:
    """Sagas whose live lease belongs to `proc` (worker ids are host:pid:random), with
    when each lease expires."""
    rows = query(
        db_url,
        "SELECT id, lease_owner, lease_expires_at FROM sagas WHERE lease_owner IS NOT NULL "
        "AND lease_expires_at > now()",
    )
    return {str(saga_id): expires for saga_id, owner, expires in rows if proc.owns(owner)}


def _attempt_windows(
    histories: dict[str, list[dict[str, Any]]],
) -> dict[tuple[str, str, str], list[tuple[datetime, datetime | None, str]]]:
    """Per (saga, step, direction): each attempt's [start, end) in database time and its
    worker; an attempt cut off by the pause has no end of its own (None)."""
    out: dict[tuple[str, str, str], list[tuple[datetime, datetime | None, str]]] = {}
    for saga_id, events in histories.items():
        open_: dict[tuple[str, str, int], tuple[datetime, str]] = {}
        for e in events:
            if e["type"] == "attempt_started":
                open_[(e["step"], e["direction"], e["attempt"])] = (parse_at(e["at"]), e["worker"])
            elif e["type"] == "attempt_finished":
                k = (e["step"], e["direction"], e["attempt"])
                if k in open_:
                    start, worker = open_.pop(k)
                    end = None if e["outcome"] == "abandoned" else parse_at(e["at"])
                    out.setdefault((saga_id, k[0], k[1]), []).append((start, end, worker))
        for (step, direction, _n), (start, worker) in open_.items():
            out.setdefault((saga_id, step, direction), []).append((start, None, worker))
    return out


def _stale_writes(
    histories: dict[str, list[dict[str, Any]]], held: list[str], owns: Callable[[str], bool]
) -> list[str]:
    """Events the paused process wrote for a saga after another process took it over."""
    stale = []
    for saga_id in held:
        taken_over = False
        for e in histories[saga_id]:
            worker = e["worker"]
            if worker and not owns(worker):
                taken_over = True
            elif worker and owns(worker) and taken_over:
                stale.append(f"{saga_id}: {e['type']} {e['step']}/{e['attempt']} at {e['at']}")
    return stale


async def _pick_moment(
    tracker: TrackingParticipant, victim: Proc, db_url: str, target_calls: int, seconds: float
) -> None:
    """Wait for `target_calls` calls, then for a moment the victim holds sagas mid-call."""
    deadline = time.monotonic() + seconds
    while len(tracker.records) < target_calls:
        assert time.monotonic() < deadline, f"only {len(tracker.records)} calls were made"
        await asyncio.sleep(0.02)
    while True:
        in_flight = [r for r in tracker.records[-200:] if r.end is None]
        if in_flight and _held_by(db_url, victim):
            return
        assert time.monotonic() < deadline, "the victim never held a saga"
        await asyncio.sleep(0.02)


async def test_sigstopped_replica_is_fenced(
    db_url: str,
    tracker: TrackingParticipant,
    launch: Callable[[str], Launcher],
    chaos_scale: Scale,
    figures: Record,
    seed: int,
) -> None:
    rng = random.Random(seed)
    count = chaos_scale.replica_sagas
    # Calls of 50-250 ms: at any moment most of a worker's sagas are waiting on a call.
    tracker.jitter = dict.fromkeys(PATHS, (0.05, 0.25))
    launcher = launch(db_url)
    api = await launcher.start_ready("api", "api")
    workers = [
        launcher.start("worker", f"worker{i}", SAGA_WORKER_CONCURRENCY=8, SAGA_LEASE_SECONDS=LEASE)
        for i in range(3)
    ]
    for worker in workers:
        await launcher.ready(worker)
    victim = workers[rng.randrange(3)]
    began = time.monotonic()

    async with client_for(api) as client:
        await register(client, tracker)
        starting = asyncio.create_task(start_many(client, count, "replica", concurrency=8))
        # About 3.5 calls per saga: freeze somewhere in the first half of the run.
        fraction = rng.uniform(0.1, 0.5)
        await _pick_moment(tracker, victim, db_url, int(count * 3.5 * fraction), 120)

        held = _held_by(db_url, victim)
        paused_at = db_now(db_url)
        calls_at_pause = len(tracker.records)
        victim.popen.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2 * LEASE)
        finally:
            victim.popen.send_signal(signal.SIGCONT)
        resumed_at = db_now(db_url)

        sagas = await starting
        final, histories = await collect(client, sagas, 120 + count * 0.2)
    elapsed = time.monotonic() - began

    problems = check_run(sagas, final, histories, tracker, may_abandon=victim.owns)
    stale = _stale_writes(histories, list(held), victim.owns)
    # Attempts of one step by different processes never overlap in database time either.
    overlapping = []
    for key, windows in _attempt_windows(histories).items():
        windows.sort(key=lambda w: w[0])
        for (s1, e1, w1), (s2, _e2, w2) in zip(windows, windows[1:], strict=False):
            if e1 is not None and s2 < e1:
                overlapping.append(f"{key}: {w1} [{s1}, {e1}) and {w2} from {s2}")

    # How long the frozen process's sagas waited: from the freeze to the first event
    # another process wrote for each.
    resume_seconds = []
    early = []
    for saga_id, expires in held.items():
        later = [
            parse_at(e["at"])
            for e in histories[saga_id]
            if e["worker"] and not victim.owns(e["worker"]) and parse_at(e["at"]) > paused_at
        ]
        if later:
            resume_seconds.append((min(later) - paused_at).total_seconds())
            if min(later) < expires:
                early.append(f"{saga_id}: taken over at {min(later)}, lease ran to {expires}")
    log = victim.output(tail=1_000_000)
    fenced = log.count("lease lost")
    after_resume = {
        sid
        for sid, events in histories.items()
        if any(victim.owns(e["worker"]) and parse_at(e["at"]) > resumed_at for e in events)
    }
    stats = summary(histories, tracker)
    figures(
        sagas=len(sagas),
        executors=3,
        lease_seconds=LEASE,
        paused_seconds=2 * LEASE,
        paused_holding=len(held),
        taken_over=len(resume_seconds),
        resume_seconds=quantiles(resume_seconds),
        fenced_writes_refused=fenced,
        stale_writes=len(stale),
        overlapping_attempts=len(overlapping) + len(tracker.overlaps),
        lost_sagas=len(sagas) - sum(1 for s in final.values() if s["finished_at"]),
        calls=stats["calls"],
        calls_at_pause=calls_at_pause,
        keys_called_again=stats["keys_called_again"],
        invariant_violations=len(problems),
        victim_worked_after_resume=len(after_resume),
        seconds=round(elapsed, 1),
        seed=seed,
    )

    context = f"seed {seed}, froze {victim.name} after {calls_at_pause} calls holding {len(held)}"
    assert not problems, report(problems, context)
    assert not stale, f"{context}: stale writes after the takeover:\n" + "\n".join(stale[:20])
    assert not overlapping, f"{context}: overlapping attempts:\n" + "\n".join(overlapping[:20])
    assert held, f"{context}: the victim held no saga when frozen"
    assert len(resume_seconds) == len(held), f"{context}: not every held saga was taken over"
    # Taken over once the 2 s lease expired (give a busy machine plenty of slack).
    assert max(resume_seconds) < 2 * LEASE + 15, resume_seconds
    assert not early, f"{context}: taken over before the lease expired:\n" + "\n".join(early)
    assert fenced >= 1, f"{context}: the thawed process never noticed it lost a lease"
    assert victim.popen.poll() is None, f"{context}: the thawed process died\n{victim.output()}"
