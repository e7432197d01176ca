"""Participant faults at 10, 30 and 50 % of attempts: 500, 503 with Retry-After, 429, a
connection reset, an answer slower than the timeout after applying the effect, and a
non-retryable 4xx.

Each (fault, rate) cell is its own definition: step `a` always succeeds, then step `f`
faults on each attempt independently with probability p, at most n = 3 attempts. A
saga is compensated exactly when all n attempts of `f` faulted, so the fraction
compensated is p**n for the retryable faults; a 4xx is final at once (one attempt), so
there it is p. The participant is a raw HTTP/1.1 server on 127.0.0.1, so that a reset
is a real TCP RST, and it dedupes effects on the Idempotency-Key like a real one.

Checked per saga, exactly: compensated iff every allowed attempt faulted; never more
than n attempts; a 4xx is attempted once; Retry-After is honoured; and the net effect
is nothing for a compensated saga, both effects for a completed one. Checked per cell
and per rate, statistically: the fraction compensated is within 4 standard deviations
(plus 0.02) of the prediction.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import Record, Scale
from tests.chaos.helpers import collect, quantiles
from tests.support.crash import Launcher, client_for

pytestmark = pytest.mark.slow

SERVICE = "faulty"
MAX_ATTEMPTS = 3
TIMEOUT = 1.0  # per attempt of `f`
SLOW = TIMEOUT + 0.6  # the slow answer comes this long after the effect
RETRY_AFTER = 1  # seconds, sent with every 503
MAX_INTERVAL = 2.0  # caps Retry-After: 1 s is honoured as is
RETRYABLE = ("500", "503", "429", "reset", "slow")
KINDS = (*RETRYABLE, "4xx")
RATES = (10, 30, 50)
ERROR_KIND = {
    "500": "http_status",
    "503": "http_status",
    "429": "http_status",
    "4xx": "http_status",
    "reset": "connection",
    "slow": "timeout",
}


def definition_name(kind: str, rate: int) -> str:
    return f"pf_{kind}_{rate}"


@dataclass
class Call:
    path: str
    key: str
    saga: str
    step: str
    attempt: int
    start: float
    fault: str | None = None  # None: answered 2xx
    end: float | None = None


@dataclass
class FaultyParticipant:
    """A minimal HTTP/1.1 server (keep-alive, Content-Length bodies) with scripted faults.

    `/a` and every `…/undo` always succeed. `/f/<kind>/<rate>` faults with probability
    rate/100 per attempt, whatever happened to earlier attempts of the same key (the
    fault is in the network or the server, not in the business logic)."""

    seed: int
    rng: random.Random = field(init=False)
    calls: list[Call] = field(default_factory=list)
    effects: dict[str, float] = field(default_factory=dict)  # action key -> applied at
    undone: dict[str, float] = field(default_factory=dict)  # compensation key -> at
    port: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                _method, path, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._answer(path, headers, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(
        self, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is gone."""
        key = headers.get("idempotency-key", "")
        attempt = headers.get("x-saga-attempt", "0")
        call = Call(
            path,
            key,
            headers.get("x-saga-id", ""),
            headers.get("x-saga-step", ""),
            int(attempt) if attempt.isdigit() else 0,
            time.monotonic(),
        )
        self.calls.append(call)
        try:
            if path.endswith("/undo"):
                self.undone.setdefault(key, time.monotonic())
                return await self._send(writer, 200, {"undone": key})
            kind, rate = "ok", 0
            if path.startswith("/f/"):
                _, _, kind, pct = path.split("/")
                rate = int(pct)
            if kind == "ok" or self.rng.random() >= rate / 100:
                self._apply(key)
                return await self._send(writer, 200, {"id": key})
            call.fault = kind
            if kind == "500":
                return await self._send(writer, 500, {"error": "internal"})
            if kind == "503":
                return await self._send(
                    writer, 503, {"error": "busy"}, {"Retry-After": str(RETRY_AFTER)}
                )
            if kind == "429":
                return await self._send(writer, 429, {"error": "too many requests"})
            if kind == "4xx":
                return await self._send(writer, 422, {"error": "rejected for good"})
            if kind == "reset":
                # The effect may or may not have happened: the caller cannot know.
                if self.rng.random() < 0.5:
                    self._apply(key)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # linger 0: the peer gets a RST
                return False
            assert kind == "slow", kind
            self._apply(key)
            await asyncio.sleep(SLOW)
            return await self._send(writer, 200, {"id": key})
        finally:
            call.end = time.monotonic()

    def _apply(self, key: str) -> None:
        self.effects.setdefault(key, time.monotonic())  # dedupe on the key

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        payload: Any,
        extra: dict[str, str] | None = None,
    ) -> bool:
        raw = json.dumps(payload).encode()
        reason = {200: "OK", 422: "Unprocessable", 429: "Too Many", 500: "Error", 503: "Busy"}
        lines = [
            f"HTTP/1.1 {status} {reason.get(status, 'X')}",
            "Content-Type: application/json",
            f"Content-Length: {len(raw)}",
            *(f"{k}: {v}" for k, v in (extra or {}).items()),
        ]
        if writer.is_closing():
            return False
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)
            await writer.drain()
        except ConnectionError:
            return False
        return True


@contextlib.asynccontextmanager
async def running(participant: FaultyParticipant) -> AsyncIterator[FaultyParticipant]:
    server = await asyncio.start_server(participant._connection, "127.0.0.1", 0)
    participant.port = server.sockets[0].getsockname()[1]
    try:
        yield participant
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5)


def _definition(kind: str, rate: int) -> dict[str, Any]:
    f_path = f"/f/{kind}/{rate}"
    quick = {"initial_interval_seconds": 0.05, "backoff_coefficient": 2.0, "jitter": False}
    return {
        "name": definition_name(kind, rate),
        "steps": [
            {
                "name": "a",
                "action": {"service": SERVICE, "path": "/a", "body": "${input}"},
                "compensation": {"service": SERVICE, "path": "/a/undo", "body": {}},
                "retry": {"max_attempts": MAX_ATTEMPTS, **quick},
                "compensation_retry": {"max_attempts": 10, **quick},
            },
            {
                "name": "f",
                "action": {"service": SERVICE, "path": f_path, "body": "${input}"},
                "compensation": {"service": SERVICE, "path": f"{f_path}/undo", "body": {}},
                "timeout_seconds": TIMEOUT,
                "retry": {
                    "max_attempts": MAX_ATTEMPTS,
                    "max_interval_seconds": MAX_INTERVAL,
                    **quick,
                },
                "compensation_retry": {"max_attempts": 10, **quick},
            },
        ],
    }


def predicted(kind: str, rate: int) -> float:
    p = rate / 100
    return p if kind == "4xx" else p**MAX_ATTEMPTS


def tolerance(prediction: float, n: int) -> float:
    return 4 * math.sqrt(prediction * (1 - prediction) / n) + 0.02


async def _start_all(
    client: httpx.AsyncClient, per_cell: int, per_second: float, rng: random.Random
) -> dict[str, tuple[str, int]]:
    """Start `per_cell` sagas of every cell, interleaved, `per_second` at most (so that
    retries are not queued behind a backlog of new sagas); id -> (kind, rate)."""
    order = [(kind, rate, i) for kind in KINDS for rate in RATES for i in range(per_cell)]
    rng.shuffle(order)
    sagas: dict[str, tuple[str, int]] = {}
    gate = asyncio.Semaphore(16)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(n: int, kind: str, rate: int, i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + n / per_second - loop.time()))
        async with gate:
            r = await client.post(
                "/v1/sagas",
                json={"definition": definition_name(kind, rate), "input": {"i": i}},
                headers={"Idempotency-Key": f"pf-{kind}-{rate}-{i}"},
            )
        assert r.status_code == 201, r.text
        sagas[r.json()["id"]] = (kind, rate)

    await asyncio.gather(*(one(n, *o) for n, o in enumerate(order)))
    return sagas


async def test_participant_faults_match_the_retry_policy(
    db_url: str,
    launch: Callable[[str], Launcher],
    chaos_scale: Scale,
    figures: Record,
    seed: int,
) -> None:
    rng = random.Random(seed)
    per_cell = chaos_scale.fault_sagas
    async with running(FaultyParticipant(seed)) as participant:
        launcher = launch(db_url)
        server = await launcher.start_ready(
            "serve", "serve", SAGA_WORKER_CONCURRENCY=64, SAGA_DB_POOL_SIZE=15
        )
        began = time.monotonic()
        async with client_for(server) as client:
            r = await client.put(
                f"/v1/services/{SERVICE}",
                json={
                    "base_url": participant.url,
                    "timeout_seconds": TIMEOUT,
                    "max_concurrency": 1000,
                    # The breaker would only slow the run down (no attempts are spent
                    # while it is open), so it stays out of the way.
                    "circuit_breaker": {"failure_threshold": 1000, "recovery_timeout_seconds": 1},
                },
            )
            assert r.status_code in (200, 201), r.text
            for kind in KINDS:
                for rate in RATES:
                    r = await client.post("/v1/definitions", json=_definition(kind, rate))
                    assert r.status_code in (200, 201), r.text
            sagas = await _start_all(client, per_cell, chaos_scale.fault_start_rate, rng)
            final, histories = await collect(client, sagas, 120 + len(sagas) * 0.3)
        elapsed = time.monotonic() - began
    _check(sagas, final, histories, participant, per_cell, figures, seed, elapsed)


def _check(
    sagas: dict[str, tuple[str, int]],
    final: dict[str, dict[str, Any]],
    histories: dict[str, list[dict[str, Any]]],
    participant: FaultyParticipant,
    per_cell: int,
    figures: Record,
    seed: int,
    elapsed: float,
) -> None:
    problems: list[str] = []
    f_calls: dict[str, list[Call]] = defaultdict(list)
    for call in participant.calls:
        if call.step == "f" and not call.path.endswith("/undo"):
            f_calls[call.saga].append(call)
    compensated: dict[tuple[str, int], int] = defaultdict(int)
    stalled = 0  # a 2xx that reached the orchestrator too late (a busy machine)
    retry_after_gaps: list[float] = []
    single_4xx = 0

    for saga_id, (kind, rate) in sagas.items():
        saga = final[saga_id]
        where = f"saga {saga_id} ({kind} at {rate}%)"
        calls = sorted(f_calls.get(saga_id, []), key=lambda c: c.attempt)
        steps = {s["name"]: s for s in saga["steps"]}
        status = saga["status"]
        if status == "compensated":
            compensated[(kind, rate)] += 1
        elif status != "completed":
            problems.append(f"{where}: ended {status}")
            continue
        # The orchestrator's view of each attempt of f: succeeded or not.
        seen_ok = {
            e["attempt"]: e["outcome"] == "succeeded"
            for e in histories[saga_id]
            if e["type"] == "attempt_finished" and e["step"] == "f" and e["direction"] == "action"
        }

        # Attempts: numbered 1..k, never more than the policy allows.
        numbers = [c.attempt for c in calls]
        if numbers != list(range(1, len(calls) + 1)) or len(calls) > MAX_ATTEMPTS:
            problems.append(f"{where}: attempts of f numbered {numbers}")
        if steps["f"]["attempts"] != len(calls):
            problems.append(
                f"{where}: f counts {steps['f']['attempts']}, participant saw {len(calls)}"
            )
        faults = [c.fault for c in calls]
        # A 2xx the orchestrator took for a timeout: the machine stalled past TIMEOUT.
        late_ok = any(c.fault is None and not seen_ok.get(c.attempt) for c in calls)
        stalled += late_ok

        # What the policy says must have happened.
        if kind == "4xx" and faults[:1] == ["4xx"]:
            single_4xx += 1
            if len(calls) != 1:
                problems.append(f"{where}: a 4xx was attempted {len(calls)} times")
            expect = "compensated"
        elif not late_ok:
            all_failed = len(calls) == MAX_ATTEMPTS and all(faults)
            expect = "compensated" if all_failed else "completed"
        else:
            expect = status  # timing, not policy: not judged here
        if status != expect:
            problems.append(f"{where}: ended {status}, attempts answered {faults}")
        if status == "compensated" and not late_ok:
            err = saga["error"] or {}
            kind_wanted = ERROR_KIND[faults[-1]] if faults[-1] else None
            if err.get("step") != "f" or err.get("kind") != kind_wanted:
                problems.append(f"{where}: error {err}, last attempt {faults[-1]}")

        # Retry-After: the next attempt waits the 1 s the participant asked for.
        for prev, nxt in itertools.pairwise(calls):
            if prev.fault == "503" and prev.end is not None:
                gap = nxt.start - prev.end
                retry_after_gaps.append(gap)
                if gap < RETRY_AFTER - 0.1:
                    problems.append(f"{where}: retried {gap:.2f}s after a 503 with Retry-After")

        # Net effect, as a deduping participant holds it.
        for step, path_key in (("a", f"{saga_id}:a"), ("f", f"{saga_id}:f")):
            applied = participant.effects.get(f"{path_key}:action")
            undone = participant.undone.get(f"{path_key}:compensation")
            if status == "completed":
                if applied is None or undone is not None:
                    problems.append(f"{where}: completed, {step} applied={applied} undone={undone}")
            else:
                if applied is not None and (undone is None or undone < applied):
                    problems.append(f"{where}: compensated, yet {step}'s effect stands")

    # The fraction compensated, per cell and per rate, against the prediction.
    cells = []
    off = []
    for kind in KINDS:
        for rate in RATES:
            n = sum(1 for k in sagas.values() if k == (kind, rate))
            want = predicted(kind, rate)
            got = compensated[(kind, rate)] / n
            tol = tolerance(want, n)
            cells.append(
                {
                    "fault": kind,
                    "rate": rate,
                    "sagas": n,
                    "compensated": compensated[(kind, rate)],
                    "observed": round(got, 4),
                    "predicted": round(want, 4),
                    "tolerance": round(tol, 4),
                }
            )
            if abs(got - want) > tol:
                off.append(cells[-1])
    pooled = []
    for rate in RATES:
        n = sum(1 for k, r in sagas.values() if r == rate and k in RETRYABLE)
        got = sum(compensated[(k, rate)] for k in RETRYABLE) / n
        want = predicted("500", rate)
        tol = tolerance(want, n)
        pooled.append(
            {"rate": rate, "sagas": n, "observed": round(got, 4), "predicted": round(want, 4)}
        )
        if abs(got - want) > tol:
            off.append({"pooled retryable": rate, "observed": got, "predicted": want, "tol": tol})
    injected = sum(1 for c in participant.calls if c.fault)
    attempts_f = sum(len(v) for v in f_calls.values())
    figures(
        sagas=len(sagas),
        sagas_per_cell=per_cell,
        max_attempts=MAX_ATTEMPTS,
        calls=len(participant.calls),
        f_attempts=attempts_f,
        faults_injected=injected,
        cells=cells,
        pooled_retryable=pooled,
        four_xx_single_attempt=single_4xx,
        retry_after_gap_seconds=quantiles(retry_after_gaps),
        late_answers=stalled,
        invariant_violations=len(problems),
        cells_off_prediction=len(off),
        seconds=round(elapsed, 1),
        seed=seed,
    )
    context = f"seed {seed}"
    assert not problems, f"{context}: {len(problems)} violations\n" + "\n".join(problems[:40])
    assert not off, f"{context}: compensated fraction off the prediction: {off}"
    assert single_4xx > 0 and retry_after_gaps, "the faults were not exercised"
