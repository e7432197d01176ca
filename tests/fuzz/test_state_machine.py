"""A Hypothesis state machine over the orchestrator as a real subprocess.

Rules: start a saga (new Idempotency-Key); start it again with the same key (same body:
the same saga, `200`; another body: `422`); make one participant path answer ok, 400
(permanent), 503 (transient) or hang past the step timeout; let time pass; SIGKILL the
orchestrator; restart it. After every step, the invariants that hold at any moment are
checked straight in the database (it answers while the orchestrator is dead):

- each Idempotency-Key maps to one saga, the one its first start answered;
- no saga or step in an illegal or inconsistent status, and no status goes back: every
  change observed is a path in the app's transition tables (without the operator's
  dead-letter retry, which this machine never does), and terminal stays terminal;
- every key a participant received is `{saga}:{step}:{direction}` of a known saga, and
  agrees with X-Saga-Id, X-Saga-Step and the path.

At teardown the participant is healed and the orchestrator restarted; every saga must
end terminal, and then:

- no effect applied twice: per saga, step and direction, one key answered 2xx;
- compensations only for actions that were applied or whose outcome is unknown (timeout,
  5xx, an attempt cut off by the kill);
- a `completed` saga applied every action and no compensation; a `compensated` one undid
  every action that was applied; a `failed` one has an open dead letter;
- the saga's steps agree with its status, and its history counts every attempt.

Each example gets a fresh database and participant. Quick mode runs a few short
examples (about 20 s); SAGA_CHAOS_FULL=1 runs 30 examples of 25 steps (about 5 min).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.core.states import SAGA_TRANSITIONS, STEP_TRANSITIONS, SagaStatus, StepStatus
from tests.fuzz.conftest import Record, full_mode
from tests.support import pg
from tests.support.crash import ADMIN_TOKEN, Launcher, Proc, TrackingParticipant
from tests.support.servers import Reply, ServerThread

pytestmark = pytest.mark.slow

FULL = full_mode()
MAX_EXAMPLES = 30 if FULL else 4
STEPS_PER_EXAMPLE = 25 if FULL else 12
DEFINITION = "sm"
SERVICE = "shop"
STEPS = ("a", "b")
STEP_TIMEOUT = 0.5
HANG = 1.5  # past the step timeout
PATHS = ("/a", "/b", "/a/undo", "/b/undo")
MODES = {
    "ok": None,
    "fail400": Reply(400, {"error": "rejected for good"}),
    "fail503": Reply(503, {"error": "busy"}, {"Retry-After": "0"}),
    "hang": Reply(200, None, {}, HANG),
}
TERMINAL = {"completed", "compensated", "failed"}
SETTLE_SECONDS = 90


def _closure(
    table: dict[Any, frozenset[Any]], operator_only: set[tuple[Any, Any]]
) -> dict[str, set[str]]:
    """Every status reachable from each status, without the operator's edges."""
    edges = {
        src: {dst for dst in dsts if (src, dst) not in operator_only} for src, dsts in table.items()
    }
    reach: dict[str, set[str]] = {}
    for start in table:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start.value] = {s.value for s in seen} | {start.value}
    return reach


SAGA_REACH = _closure(
    SAGA_TRANSITIONS,
    {(SagaStatus.FAILED, SagaStatus.RUNNING), (SagaStatus.FAILED, SagaStatus.COMPENSATING)},
)
STEP_REACH = _closure(
    STEP_TRANSITIONS,
    {
        (StepStatus.FAILED, StepStatus.RUNNING),
        (StepStatus.COMPENSATION_FAILED, StepStatus.COMPENSATING),
    },
)


def _step(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "action": {"service": SERVICE, "path": f"/{name}", "body": {"n": "${input.n}"}},
        "compensation": {
            "service": SERVICE,
            "path": f"/{name}/undo",
            "body": {"saga": "${saga.id}", "step": name},
        },
        "timeout_seconds": STEP_TIMEOUT,
        "retry": {
            "max_attempts": 2,  # two timeouts (about 1.1 s) and the outcome is unknown
            "initial_interval_seconds": 0.1,
            "max_interval_seconds": 0.3,
            "jitter": False,
        },
        "compensation_retry": {
            "max_attempts": 5,
            "initial_interval_seconds": 0.1,
            "max_interval_seconds": 0.3,
            "jitter": False,
        },
    }


# --- one example -------------------------------------------------------------------------


@dataclass
class Totals:
    """What all examples went through, for the figures file."""

    examples: int = 0
    steps: Counter[str] = field(default_factory=Counter)
    sagas: int = 0
    final_statuses: Counter[str] = field(default_factory=Counter)
    participant_calls: int = 0
    keys_called_again: int = 0
    abandoned_attempts: int = 0
    settle_seconds: list[float] = field(default_factory=list)


@dataclass
class World:
    """What the examples share: the PostgreSQL server, a template database, a workdir."""

    pg_url: str
    template: str
    workdir: Path
    totals: Totals
    counter: Iterator[int] = field(default_factory=itertools.count)


class SagaMachine(RuleBasedStateMachine):
    keys = Bundle("keys")

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.n = next(world.counter)
        world.totals.examples += 1
        self.db_name = pg.clone(world.pg_url, world.template)
        self.db_url = pg.with_database(world.pg_url, self.db_name)
        self.conn = psycopg.connect(self.db_url, autocommit=True)
        self.participant = TrackingParticipant(seed=self.n)
        self.server = ServerThread(self.participant.app)
        self.participant.url = self.server.start()
        workdir = world.workdir / f"example{self.n}"
        workdir.mkdir(parents=True)
        self.launcher = Launcher(self.db_url, workdir)
        self.proc: Proc | None = None
        self.client: httpx.Client | None = None
        self.starts = 0
        self.by_key: dict[str, tuple[dict[str, Any], str]] = {}  # key -> (body, saga id)
        self.seen: dict[str, str] = {}  # saga id -> last status seen
        self.seen_steps: dict[tuple[str, str], str] = {}
        self.kills = 0
        try:
            self._start_orchestrator()
            self._register()
        except BaseException:
            self._cleanup()
            raise

    # --- helpers ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def _start_orchestrator(self) -> None:
        self.proc = self.launcher.start("serve", f"serve{len(self.launcher.procs)}")
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=2) as probe:
            while True:
                if self.proc.popen.poll() is not None:
                    raise AssertionError(f"orchestrator exited\n{self.proc.output()}")
                with contextlib.suppress(httpx.HTTPError):
                    if probe.get(self.proc.url + "/readyz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"orchestrator not ready\n{self.proc.output()}")
                time.sleep(0.1)
        if self.client is not None:
            self.client.close()
        self.client = httpx.Client(
            base_url=self.proc.url,
            timeout=30,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )

    def _api(self) -> httpx.Client:
        assert self.client is not None and self.alive, "the orchestrator is not running"
        return self.client

    def _register(self) -> None:
        api = self._api()
        r = api.put(
            f"/v1/services/{SERVICE}",
            json={
                "base_url": self.participant.url,
                "timeout_seconds": STEP_TIMEOUT,
                "circuit_breaker": {"failure_threshold": 5, "recovery_timeout_seconds": 0.5},
            },
        )
        assert r.status_code == 201, r.text
        definition = {"name": DEFINITION, "steps": [_step(s) for s in STEPS]}
        r = api.post("/v1/definitions", json=definition)
        assert r.status_code == 201, r.text

    def _context(self) -> str:
        return f"(example {self.n}, db {self.db_name})\n{self.launcher.dump()[-6000:]}"

    def _cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
        self.launcher.close()
        self.server.stop()
        self.conn.close()
        pg.drop(self.world.pg_url, self.db_name)

    # --- rules -----------------------------------------------------------------------

    @precondition(lambda self: self.alive)
    @rule(target=keys, n=st.integers(0, 99))
    def start_saga(self, n: int) -> str:
        self.world.totals.steps["start"] += 1
        self.starts += 1
        key = f"key-{self.n}-{self.starts}"
        body = {"definition": DEFINITION, "input": {"n": n}}
        r = self._api().post("/v1/sagas", json=body, headers={"Idempotency-Key": key})
        assert r.status_code == 201, r.text
        assert r.headers["location"] == f"/v1/sagas/{r.json()['id']}"
        self.by_key[key] = (body, r.json()["id"])
        return key

    @precondition(lambda self: self.alive)
    @rule(key=keys, same=st.booleans())
    def start_again(self, key: str, same: bool) -> None:
        self.world.totals.steps["duplicate_same" if same else "duplicate_other"] += 1
        body, saga_id = self.by_key[key]
        if same:
            r = self._api().post("/v1/sagas", json=body, headers={"Idempotency-Key": key})
            assert r.status_code == 200, r.text
            assert r.json()["id"] == saga_id, (key, r.json()["id"], saga_id)
            assert r.headers["idempotent-replayed"] == "true"
        else:
            other = {**body, "input": {"n": body["input"]["n"] + 1}}
            r = self._api().post("/v1/sagas", json=other, headers={"Idempotency-Key": key})
            assert r.status_code == 422, r.text
            assert "idempotency-key-reused" in r.json()["type"], r.text

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from(sorted(MODES)))
    def participant_answers(self, path: str, mode: str) -> None:
        self.world.totals.steps[f"participant_{mode}"] += 1
        reply = MODES[mode]
        if reply is None:
            self.participant.defaults.pop(path, None)
        else:
            self.participant.always(path, reply)

    @rule(seconds=st.sampled_from([0.2, 0.6, 1.5, 3.0]))
    def let_time_pass(self, seconds: float) -> None:
        self.world.totals.steps["wait"] += 1
        time.sleep(seconds)

    @precondition(lambda self: self.alive)
    @rule()
    def kill(self) -> None:
        self.world.totals.steps["kill"] += 1
        assert self.proc is not None
        self.proc.kill()
        self.proc.popen.wait(10)
        self.kills += 1

    @precondition(lambda self: not self.alive)
    @rule()
    def restart(self) -> None:
        self.world.totals.steps["restart"] += 1
        self._start_orchestrator()

    # --- invariants at any moment ----------------------------------------------------

    @invariant()
    def consistent_now(self) -> None:
        sagas = self.conn.execute("SELECT id::text, status, idempotency_key FROM sagas").fetchall()
        steps = self.conn.execute(
            "SELECT saga_id::text, name, status FROM saga_steps ORDER BY saga_id, idx"
        ).fetchall()
        problems = check_now(
            sagas, steps, self.by_key, self.seen, self.seen_steps, self.participant.records
        )
        assert not problems, "\n".join(problems) + "\n" + self._context()

    # --- the end ---------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            for path in PATHS:
                self.participant.defaults.pop(path, None)
            if not self.alive:
                self._start_orchestrator()
            self._settle()
        finally:
            self._cleanup()

    def _settle(self) -> None:
        api = self._api()
        ids = [saga_id for _, saga_id in self.by_key.values()]
        started = time.monotonic()
        final: dict[str, dict[str, Any]] = {}
        for saga_id in ids:
            while True:
                remaining = SETTLE_SECONDS - (time.monotonic() - started)
                wait = max(0.1, min(remaining, 10))
                r = api.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": wait})
                assert r.status_code == 200, r.text
                if r.json()["status"] in TERMINAL:
                    final[saga_id] = r.json()
                    break
                assert remaining > 0, (
                    f"saga {saga_id} still {r.json()['status']} {SETTLE_SECONDS}s after the "
                    f"participant healed: {r.json()['steps']}\n{self._context()}"
                )
        totals = self.world.totals
        totals.settle_seconds.append(round(time.monotonic() - started, 2))
        histories = {saga_id: _events(api, saga_id) for saga_id in ids}
        r = api.get("/v1/admin/dead-letters", params={"status": "open", "limit": 500})
        assert r.status_code == 200, r.text
        open_letters = {d["saga_id"] for d in r.json()["items"]}
        self.consistent_now()
        records = list(self.participant.records)
        problems = check_final(final, histories, records, open_letters)
        per_key = Counter(rec.key for rec in records)
        totals.sagas += len(ids)
        totals.final_statuses.update(s["status"] for s in final.values())
        totals.participant_calls += len(records)
        totals.keys_called_again += sum(1 for n in per_key.values() if n > 1)
        totals.abandoned_attempts += sum(
            1 for events in histories.values() for e in events if e.get("outcome") == "abandoned"
        )
        assert not problems, "\n".join(problems[:40]) + "\n" + self._context()


def _events(api: httpx.Client, saga_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        r = api.get(f"/v1/sagas/{saga_id}/events", params=params)
        assert r.status_code == 200, r.text
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if not cursor:
            return items


# --- the invariants ----------------------------------------------------------------------


def check_now(
    sagas: list[tuple[str, str, str | None]],
    steps: list[tuple[str, str, str]],
    by_key: dict[str, tuple[dict[str, Any], str]],
    seen: dict[str, str],
    seen_steps: dict[tuple[str, str], str],
    records: list[Any],
) -> list[str]:
    """What must hold at any moment, whatever is running or dead. Updates `seen*`."""
    problems: list[str] = []
    ids = {saga_id for saga_id, _, _ in sagas}
    wanted = {saga_id for _, saga_id in by_key.values()}
    if ids != wanted:
        problems.append(f"sagas in the database {sorted(ids)} != sagas started {sorted(wanted)}")
    owners: dict[str, list[str]] = defaultdict(list)
    for saga_id, status, key in sagas:
        if key is not None:
            owners[key].append(saga_id)
        if status not in SAGA_REACH:
            problems.append(f"saga {saga_id}: unknown status {status!r}")
            continue
        before = seen.get(saga_id, "running")
        if status not in SAGA_REACH[before]:
            problems.append(f"saga {saga_id}: went from {before} to {status}")
        seen[saga_id] = status
    for key, (_, saga_id) in by_key.items():
        if owners.get(key) != [saga_id]:
            problems.append(f"Idempotency-Key {key}: sagas {owners.get(key)}, started {saga_id}")
    by_saga: dict[str, list[str]] = defaultdict(list)
    for saga_id, name, status in steps:
        by_saga[saga_id].append(status)
        before = seen_steps.get((saga_id, name), "pending")
        if status not in STEP_REACH.get(before, set()):
            problems.append(f"saga {saga_id} step {name}: went from {before} to {status}")
        seen_steps[(saga_id, name)] = status
    for saga_id, status, _ in sagas:
        problems += _steps_agree(saga_id, status, by_saga[saga_id])
    for rec in list(records):
        direction = rec.direction
        want = f"{rec.saga}:{rec.step}:{direction}"
        if rec.key != want or rec.saga not in ids or rec.step not in STEPS:
            problems.append(f"participant got key {rec.key!r} on {rec.path} (expected {want})")
        if rec.path.strip("/").split("/")[0] != rec.step:
            problems.append(f"participant got step {rec.step} on {rec.path}")
    return problems


def _steps_agree(saga_id: str, status: str, steps: list[str]) -> list[str]:
    problems = []
    where = f"saga {saga_id} is {status} with steps {steps}"
    if len(steps) != len(STEPS):
        problems.append(f"{where}: not {len(STEPS)} steps")
    if status == "completed" and set(steps) != {"succeeded"}:
        problems.append(where)
    if status == "compensated" and not set(steps) <= {"pending", "failed", "compensated"}:
        problems.append(where)
    if status == "failed" and (
        "compensation_failed" not in steps or {"running", "compensating"} & set(steps)
    ):
        problems.append(where)
    if status == "running" and {"compensating", "compensated", "compensation_failed"} & set(steps):
        problems.append(where)
    return problems


def check_final(
    final: dict[str, dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    records: list[Any],
    open_letters: set[str],
) -> list[str]:
    """What must hold once every saga is terminal."""
    problems: list[str] = []
    calls: dict[str, list[Any]] = defaultdict(list)
    for rec in records:
        calls[rec.saga].append(rec)
    for saga_id, saga in final.items():
        where = f"saga {saga_id} ({saga['status']})"
        mine = calls.get(saga_id, [])
        events = histories[saga_id]
        applied: dict[tuple[str, str], set[str]] = defaultdict(set)
        called: set[tuple[str, str]] = set()
        for rec in mine:
            called.add((rec.step, rec.direction))
            if rec.status is not None and 200 <= rec.status < 300:
                applied[(rec.step, rec.direction)].add(rec.key)
        for (step, direction), keys in applied.items():
            if len(keys) != 1:
                problems.append(f"{where}: {step}/{direction} applied under keys {keys}")
        unknown = _unknown_actions(events)
        done = {s for (s, d) in applied if d == "action"}
        undone = {s for (s, d) in applied if d == "compensation"}
        for step in {s for (s, d) in called if d == "compensation"}:
            if step not in done and step not in unknown:
                seen = [(r.direction, r.attempt, r.status) for r in mine if r.step == step]
                problems.append(
                    f"{where}: {step} compensated though its action surely did not happen "
                    f"(calls: {seen})"
                )
        status = saga["status"]
        if status == "completed":
            if done != set(STEPS):
                problems.append(f"{where}: actions applied {sorted(done)}")
            if any(d == "compensation" for _, d in called):
                problems.append(f"{where}: a completed saga was compensated")
        elif status == "compensated":
            if not done <= undone:
                problems.append(f"{where}: applied {sorted(done)} but undid {sorted(undone)}")
        elif saga_id not in open_letters:
            problems.append(f"{where}: failed without an open dead letter")
        if saga["finished_at"] is None:
            problems.append(f"{where}: no finished_at")
        problems += _history_counts(where, saga, events)
    return problems


def _unknown_actions(events: list[dict[str, Any]]) -> set[str]:
    """Steps with an action attempt whose outcome the orchestrator could not know."""
    started: set[tuple[str, int]] = set()
    finished: set[tuple[str, int]] = set()
    unknown: set[str] = set()
    for e in events:
        if e["direction"] != "action":
            continue
        k = (e["step"], e["attempt"])
        if e["type"] == "attempt_started":
            started.add(k)
        elif e["type"] == "attempt_finished":
            finished.add(k)
            if (
                e["outcome"] == "abandoned"
                or e["error_kind"] in ("timeout", "connection")
                or (e["status_code"] or 0) >= 500
            ):
                unknown.add(e["step"])
    return unknown | {step for step, _ in started - finished}


def _history_counts(where: str, saga: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    problems = []
    types = [e["type"] for e in events]
    if not types or types[0] != "saga_started":
        problems.append(f"{where}: history starts with {types[:1]}")
    if f"saga_{saga['status']}" not in types:
        problems.append(f"{where}: no saga_{saga['status']} event")
    for step in saga["steps"]:
        for direction, field_name in (
            ("action", "attempts"),
            ("compensation", "compensation_attempts"),
        ):
            numbers = [
                e["attempt"]
                for e in events
                if e["type"] == "attempt_started"
                and e["step"] == step["name"]
                and e["direction"] == direction
            ]
            if numbers != list(range(1, len(numbers) + 1)) or len(numbers) != step[field_name]:
                problems.append(
                    f"{where}: {step['name']}/{direction} attempts {numbers}, "
                    f"step says {step[field_name]}"
                )
    return problems


# --- the test ----------------------------------------------------------------------------


def test_saga_state_machine(pg_url: str, template_db: str, tmp_path: Path, figures: Record) -> None:
    started = time.monotonic()
    world = World(pg_url, template_db, tmp_path, Totals())
    run_state_machine_as_test(
        lambda: SagaMachine(world),
        settings=settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: each run takes seconds
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    totals = world.totals
    figures(
        examples=totals.examples,
        steps_per_example=STEPS_PER_EXAMPLE,
        rules_run=dict(totals.steps),
        kills=totals.steps["kill"],
        sagas=totals.sagas,
        final_statuses=dict(totals.final_statuses),
        participant_calls=totals.participant_calls,
        keys_called_again=totals.keys_called_again,
        abandoned_attempts=totals.abandoned_attempts,
        settle_seconds=totals.settle_seconds,
        invariant_violations=0,
        seconds=round(time.monotonic() - started, 1),
    )
