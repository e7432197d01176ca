"""Every saga ends, whatever its input and whatever participants answer (contract §5).

A Hypothesis property over generated saga inputs: any Unicode (control characters
included), lone surrogates where JSON allows them, huge strings and arbitrary JSON,
rendered into header values, path segments, query values, absolute URLs and bodies, and
sent to a participant that answers each call as the example says: 2xx with or without a
JSON body, 4xx, 5xx, a hang past the timeout, a reset connection, a gzip bomb, a body
over the response cap, an encoding nobody can decode. The orchestrator is a real `serve`
subprocess. For every example:

- a start answers 201, or 4xx for input the API refuses; never 5xx;
- every saga reaches a terminal status within a bound (its policies' worst case, padded);
- no step makes more attempts (or compensation attempts) than its policy allows;
- the orchestrator logs no task crash and no traceback;
- a finished saga is not written again (its rows' xmin are unchanged two seconds later)
  and is not due.

Quick mode runs a few examples of several sagas each; SAGA_CHAOS_FULL=1 runs many more.
The figures land in test-artifacts/chaos/figures.jsonl (and docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.participants.client import MAX_RESPONSE_BYTES
from tests.fuzz.conftest import FIGURES, full_mode, mode
from tests.support import pg
from tests.support.crash import ADMIN_TOKEN, Launcher, Proc
from tests.support.servers import ServerThread

pytestmark = pytest.mark.slow

FULL = full_mode()
EXAMPLES = 40 if FULL else 3
SAGAS_PER_EXAMPLE = (8, 12) if FULL else (6, 8)
TIMEOUT = 0.4  # per attempt
HANG = 1.0  # past the timeout
ATTEMPTS = {"a": 3, "b": 2, "c": 2}
COMPENSATION_ATTEMPTS = 3
SETTLE_SECONDS = 90  # far above the worst case of these policies (about 10 s)
TERMINAL = ("completed", "compensated", "failed")
CRASH_LINES = ("saga task failed", "saga task crashed", "Traceback")

MODES = (
    "ok",
    "ok_empty",
    "ok_text",
    "http_400",
    "http_503",
    "http_500",
    "hang",
    "reset",
    "gzip_bomb",
    "too_large",
    "bad_encoding",
)
PARTS = ("a", "a-undo", "b", "b-undo", "c")
# Half the calls succeed, so that sagas get past their first step.
_MODE = st.one_of(st.just("ok"), st.sampled_from(MODES))


def _bomb() -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = b"\0" * (1 << 20)
    return b"".join([deflate.compress(zeros) for _ in range(64)] + [deflate.flush()])


BOMB = _bomb()  # 64 MiB of zeros in about 64 KB


class Anything:
    """A participant whose every answer is chosen by the example (`X-Case` says which)."""

    def __init__(self) -> None:
        self.plans: dict[str, dict[str, str]] = {}
        self.calls: Counter[str] = Counter()
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])

    async def _handle(self, request: Request) -> Response:
        await request.body()
        part = request.url.path.strip("/").split("/", 1)[0]
        mode_ = self.plans.get(request.headers.get("x-case", ""), {}).get(part, "ok")
        self.calls[mode_] += 1
        if mode_ == "hang":
            await asyncio.sleep(HANG)
            return Response("{}", media_type="application/json")
        if mode_ == "ok":
            return Response(json.dumps({"id": uuid.uuid4().hex}), media_type="application/json")
        if mode_ == "ok_empty":
            return Response(status_code=204)
        if mode_ == "ok_text":
            return Response("done", media_type="text/plain")
        if mode_.startswith("http_"):
            status = int(mode_.removeprefix("http_"))
            return Response(
                json.dumps({"error": "x" * 500}),
                status_code=status,
                headers={"Retry-After": "0"},
                media_type="application/json",
            )
        if mode_ == "reset":
            # Declares more than it sends: the server drops the connection mid-answer.
            return Response(b"{}", headers={"Content-Length": "100"})
        if mode_ == "gzip_bomb":
            return Response(
                BOMB,
                headers={"Content-Encoding": "gzip"},
                media_type="application/json",
            )
        if mode_ == "too_large":
            body = json.dumps({"blob": "y" * (MAX_RESPONSE_BYTES + 100)})
            return Response(body, media_type="application/json")
        assert mode_ == "bad_encoding"
        return Response(b"\x00garbage", headers={"Content-Encoding": "br"})


def _definition(name: str, participant: str, pivot: bool) -> dict[str, Any]:
    def retry(n: int) -> dict[str, Any]:
        return {
            "max_attempts": n,
            "initial_interval_seconds": 0.05,
            "max_interval_seconds": 0.1,
            "jitter": True,
        }

    case = {"X-Case": "${input.case}"}
    return {
        "name": name,
        "steps": [
            {
                "name": "a",
                "action": {
                    "service": "any",
                    "path": "/a/${input.p}?q=${input.q}&n=1",
                    "headers": {**case, "X-Value": "${input.h}", "X-Mixed": "v=${input.h}!"},
                    "body": {"b": "${input.b}", "all": "${input}"},
                },
                "compensation": {
                    "service": "any",
                    "path": "/a-undo/${input.p}",
                    "headers": {**case, "X-Value": "${input.h}"},
                    "body": {"id": "${steps.a.response.id}"},
                },
                "retry": retry(ATTEMPTS["a"]),
                "compensation_retry": retry(COMPENSATION_ATTEMPTS),
            },
            {
                "name": "b",
                "pivot": pivot,
                "action": {
                    "url": f"{participant}/b/${{input.q}}?p=${{input.p}}",
                    "headers": case,
                    "body": "${steps.a.response}",
                },
                "compensation": {
                    "url": f"{participant}/b-undo/${{input.p}}",
                    "headers": case,
                    "body": {"b": "${input.b}"},
                },
                "timeout_seconds": TIMEOUT,
                "retry": retry(ATTEMPTS["b"]),
                "compensation_retry": retry(COMPENSATION_ATTEMPTS),
            },
            {
                "name": "c",
                "critical": pivot,  # after a pivot a failure parks the saga; else it goes on
                "action": {
                    "service": "any",
                    "path": "/c/${input.h}",
                    "headers": {**case, "X-Value": "${input.h}"},
                    "body": "${input.b}",
                },
                "retry": retry(ATTEMPTS["c"]),
            },
        ],
    }


# --- inputs ------------------------------------------------------------------------------

_SAFE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
_ANY = st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=40)
_TEXT = st.one_of(
    _SAFE,
    _SAFE,
    _ANY,  # any Unicode but surrogates and NUL, control characters included
    _ANY,
    st.sampled_from(["", "../../admin?x=1#", "Zoë", "a\r\nX-Injected: 1", "%2e%2e", "\t", " "]),
    st.builds(
        lambda c, n: c * n,
        st.characters(exclude_characters="\x00"),
        st.integers(1_000, 200_000),
    ),  # huge
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_SAFE, inner, max_size=4),
    max_leaves=12,
)
_HEADER = st.one_of(_SAFE, _SAFE, _SAFE, _SAFE, _TEXT, _JSON)


@dataclass
class Case:
    definition: str
    input: dict[str, Any]
    plan: dict[str, str]
    raw_surrogate: bool  # send a lone surrogate as a JSON escape: the API must refuse it


@st.composite
def cases(draw: st.DrawFn) -> Case:
    return Case(
        definition=draw(st.sampled_from(["fz", "fzp"])),
        input={
            "case": uuid.uuid4().hex,
            "p": draw(_TEXT),
            "q": draw(_TEXT),
            "h": draw(_HEADER),
            # NUL included now and then: jsonb cannot hold it, so the API answers 422.
            "b": draw(st.one_of(_JSON, _JSON, _JSON, st.text(max_size=10))),
        },
        plan={part: draw(_MODE) for part in PARTS},
        raw_surrogate=draw(st.integers(0, 9)) == 0,
    )


# --- the world the examples share ---------------------------------------------------------


@dataclass
class Totals:
    examples: int = 0
    generated: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    max_attempts_seen: dict[str, int] = field(default_factory=dict)
    max_compensation_attempts_seen: int = 0
    settle_seconds: list[float] = field(default_factory=list)
    modes: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class World:
    db_url: str
    proc: Proc
    participant: Anything
    log: Path
    totals: Totals


@pytest.fixture(scope="module")
def world(
    pg_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    name = pg.clone(pg_url, template_db)
    db_url = pg.with_database(pg_url, name)
    participant = Anything()
    server = ServerThread(participant.app)
    url = server.start()
    launcher = Launcher(db_url, tmp_path_factory.mktemp("every-saga-ends"))
    totals = Totals()
    try:
        proc = launcher.start("serve", "orchestrator", SAGA_LEASE_SECONDS=2)
        asyncio.run(launcher.ready(proc))
        with httpx.Client(
            base_url=proc.url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as client:
            r = client.put(
                "/v1/services/any",
                json={
                    "base_url": url,
                    "timeout_seconds": TIMEOUT,
                    "max_concurrency": 100,
                    # Breakers are tested elsewhere; here they would only add waiting time.
                    "circuit_breaker": {"failure_threshold": 1000},
                },
            )
            assert r.status_code in (200, 201), r.text
            for definition, pivot in (("fz", False), ("fzp", True)):
                r = client.post("/v1/definitions", json=_definition(definition, url, pivot))
                assert r.status_code in (200, 201), r.text
        yield World(db_url, proc, participant, proc.log, totals)
    finally:
        launcher.close()
        server.stop()
        pg.drop(pg_url, name)
        _record(totals)


def _record(totals: Totals) -> None:
    line = {
        "test": "tests/fuzz/test_every_saga_ends.py::test_every_saga_ends",
        "mode": mode(),
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "examples": totals.examples,
        "sagas_generated": totals.generated,
        "refused_at_start": dict(totals.refused),
        "sagas_started": sum(totals.statuses.values()),
        "terminal": dict(totals.statuses),
        "max_attempts_seen": totals.max_attempts_seen,
        "attempts_allowed": ATTEMPTS,
        "max_compensation_attempts_seen": totals.max_compensation_attempts_seen,
        "compensation_attempts_allowed": COMPENSATION_ATTEMPTS,
        "slowest_to_terminal_seconds": round(max(totals.settle_seconds, default=0), 2),
        "participant_answers": dict(totals.modes),
        "step_error_kinds": dict(totals.error_kinds),
    }
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(json.dumps(line) + "\n")
    print("figures:", json.dumps(line))


# --- the property ----------------------------------------------------------------------------


def _start(client: httpx.Client, case: Case) -> httpx.Response:
    body = json.dumps({"definition": case.definition, "input": case.input}, ensure_ascii=True)
    if case.raw_surrogate:
        body = body.replace('"case"', '"\\ud800case"', 1)
    return client.post(
        "/v1/sagas", content=body.encode(), headers={"Content-Type": "application/json"}
    )


def _versions(conn: psycopg.Connection[Any], ids: list[str]) -> dict[str, tuple[Any, ...]]:
    rows = conn.execute(
        """
        SELECT s.id::text, s.xmin::text, s.due_at IS NULL,
               (SELECT string_agg(st.xmin::text, ',' ORDER BY st.idx)
                  FROM saga_steps st WHERE st.saga_id = s.id)
          FROM sagas s WHERE s.id = ANY(%s::uuid[])
        """,
        (ids,),
    ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=False,
)
@given(batch=st.lists(cases(), min_size=SAGAS_PER_EXAMPLE[0], max_size=SAGAS_PER_EXAMPLE[1]))
def test_every_saga_ends(world: World, batch: list[Case]) -> None:
    totals = world.totals
    totals.examples += 1
    totals.generated += len(batch)
    for case in batch:
        world.participant.plans[case.input["case"]] = case.plan
    log_offset = world.log.stat().st_size
    started: dict[str, float] = {}
    with httpx.Client(
        base_url=world.proc.url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as client:
        for case in batch:
            r = _start(client, case)
            assert r.status_code < 500, r.text
            if r.status_code != 201:
                assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith(
                    "application/problem+json"
                ), r.text
                totals.refused[r.status_code] += 1
                continue
            started[r.json()["id"]] = time.monotonic()
        sagas: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + SETTLE_SECONDS
        for saga_id, began in started.items():
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"saga {saga_id} did not end within {SETTLE_SECONDS}s"
                r = client.get(f"/v1/sagas/{saga_id}", params={"wait_seconds": min(10, remaining)})
                assert r.status_code == 200, r.text
                if r.json()["status"] in TERMINAL:
                    sagas[saga_id] = r.json()
                    totals.settle_seconds.append(time.monotonic() - began)
                    break

    for saga in sagas.values():
        totals.statuses[saga["status"]] += 1
        for step in saga["steps"]:
            name = step["name"]
            if step["last_error"]:
                totals.error_kinds[step["last_error"]["kind"]] += 1
            assert step["attempts"] <= ATTEMPTS[name], (saga["id"], step)
            assert step["compensation_attempts"] <= COMPENSATION_ATTEMPTS, (saga["id"], step)
            seen = totals.max_attempts_seen
            seen[name] = max(seen.get(name, 0), step["attempts"])
            totals.max_compensation_attempts_seen = max(
                totals.max_compensation_attempts_seen, step["compensation_attempts"]
            )

    with psycopg.connect(world.db_url, autocommit=True) as conn:
        before = _versions(conn, list(sagas))
        time.sleep(2)
        after = _versions(conn, list(sagas))
    assert after == before, "a finished saga was written again"
    assert all(not_due for _xmin, not_due, _steps in after.values()), "a finished saga is due"

    with world.log.open(errors="replace") as out:
        out.seek(log_offset)
        new_lines = out.read()
    crashes = [line for line in new_lines.splitlines() if any(c in line for c in CRASH_LINES)]
    assert not crashes, "\n".join(crashes[:20])
    totals.modes = world.participant.calls.copy()
