"""Every saga ends: poison input, a cancel timed into the pivot, terminal sagas left alone,
service changes seen at once, and participant answers that could blow up memory.

Each test reproduces one way a saga used to get stuck (claimed into the same crash again
and again, spinning, or holding a bulkhead slot) and checks that it now ends, with no step
making more attempts than its policy allows.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from app.main import create_app
from app.participants.client import MAX_RESPONSE_BYTES
from tests.conftest import make_settings, wait_terminal
from tests.support.engine_helpers import (
    define,
    events,
    fast_retry,
    get_saga,
    put_service,
    query,
    run,
    start,
    step,
    step_of,
)
from tests.support.servers import Participant, Reply, serve


def _with_headers(spec: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    spec["action"]["headers"] = headers
    return spec


async def _row_versions(db_url: str, saga_id: str) -> list[Any]:
    """The xmin of the saga's row and its steps' rows: any write changes one."""
    rows = await query(
        db_url,
        "SELECT xmin::text AS v FROM sagas WHERE id = %(id)s "
        "UNION ALL SELECT xmin::text FROM saga_steps WHERE saga_id = %(id)s",
        {"id": saga_id},
    )
    return sorted(r["v"] for r in rows)


async def _stays_put(db_url: str, saga_id: str, seconds: float = 2.0) -> None:
    """A terminal saga causes no more writes: not claimed, not touched."""
    before = await _row_versions(db_url, saga_id)
    await asyncio.sleep(seconds)
    assert await _row_versions(db_url, saga_id) == before, "a finished saga was written again"
    (row,) = await query(db_url, "SELECT due_at FROM sagas WHERE id = %(id)s", {"id": saga_id})
    assert row["due_at"] is None


# --- 1. poison input ------------------------------------------------------------------


async def test_a_non_ascii_templated_header_fails_the_step_as_template(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "poison_header",
        [
            step("a"),
            _with_headers(step("b"), {"X-Name": "${input.name}"}),
        ],
    )
    saga = await run(orchestrator, "poison_header", {"name": "Zoë"})

    assert saga["status"] == "compensated", saga
    b = step_of(saga, "b")
    assert b["status"] == "failed" and b["attempts"] == 1, b
    assert b["last_error"]["kind"] == "template", b
    assert "non-ASCII" in b["last_error"]["message"]
    assert saga["error"]["kind"] == "template"
    assert participant.to("/b") == [], "nothing may be sent for a request that cannot be built"
    # b was never sent, so only a is compensated.
    assert [c.path for c in participant.calls] == ["/a", "/a/undo"]
    await _stays_put(db_url, saga["id"])


@pytest.mark.parametrize("value", ["line\nbreak", "tab\tthen\rreturn", "bell\x07"])
async def test_control_characters_in_a_templated_header_fail_as_template(
    orchestrator: httpx.AsyncClient, participant: Participant, value: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator, "ctl_header", [_with_headers(step("a"), {"X-Note": "note: ${input.v}"})]
    )
    saga = await run(orchestrator, "ctl_header", {"v": value})
    a = step_of(saga, "a")
    assert saga["status"] == "compensated" and a["attempts"] == 1, saga
    assert a["last_error"]["kind"] == "template"
    assert participant.calls == []


async def test_a_non_ascii_service_header_is_refused_at_registration(
    orchestrator: httpx.AsyncClient,
) -> None:
    r = await orchestrator.put(
        "/v1/services/svc",
        json={"base_url": "http://127.0.0.1:9", "headers": {"X-Team": "Zoë"}},
    )
    assert r.status_code == 422, r.text
    assert "non-ASCII" in r.text
    r = await orchestrator.post(
        "/v1/definitions",
        json={
            "name": "static_bad",
            "steps": [
                {"name": "a", "action": {"url": "http://127.0.0.1:9/x", "headers": {"X": "é"}}}
            ],
        },
    )
    assert r.status_code == 422, r.text


async def test_a_stored_service_header_that_cannot_be_sent_fails_as_template(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    """A service row written before header values were checked (or by hand)."""
    await put_service(orchestrator, participant.url, headers={"X-Team": "ok"})
    await define(orchestrator, "legacy", [step("a")])
    await query(
        db_url,
        'UPDATE services SET headers = \'{"X-Team": "Zoë"}\', version = version + 1 '
        "WHERE name = 'svc' RETURNING name",
    )
    saga = await run(orchestrator, "legacy", {})
    a = step_of(saga, "a")
    assert saga["status"] == "compensated", saga
    # Never sent, so there is nothing to compensate.
    assert a["status"] == "failed" and a["attempts"] == 1, a
    assert a["compensation_attempts"] == 0
    assert a["last_error"]["kind"] == "template"
    assert participant.calls == []
    await _stays_put(db_url, saga["id"])


async def test_control_characters_and_traversal_in_a_path_stay_in_their_segment(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "paths",
        [step("a", path="/orders/${input.id}/status?tag=${input.tag}", compensate=False)],
    )
    saga = await run(orchestrator, "paths", {"id": "../../admin/wipe?all=1#\t", "tag": "x&y=1#z"})
    assert saga["status"] == "completed", saga
    (call,) = participant.calls
    assert call.raw_path == b"/orders/%2E%2E%2F%2E%2E%2Fadmin%2Fwipe%3Fall%3D1%23%09/status"
    # Decoded by the participant, the value is still one segment of the written path.
    assert call.path == "/orders/../../admin/wipe?all=1#\t/status", call.path


async def test_poison_in_a_compensation_ends_failed_within_its_policy(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    spec = step("a")
    spec["compensation"]["headers"] = {"X-Name": "${input.name}"}
    await define(orchestrator, "poison_undo", [spec, step("b")])
    participant.script("/b", Reply(400, {"error": "no"}))
    saga = await run(orchestrator, "poison_undo", {"name": "Zoë"})

    assert saga["status"] == "failed", saga
    a = step_of(saga, "a")
    assert a["status"] == "compensation_failed", a
    assert a["compensation_attempts"] == 1, "a template failure is final"
    letters = await query(
        db_url,
        "SELECT direction, status FROM dead_letters WHERE saga_id = %(id)s",
        {"id": saga["id"]},
    )
    assert letters == [{"direction": "compensation", "status": "open"}]
    assert participant.to("/a/undo") == []
    await _stays_put(db_url, saga["id"])


async def test_a_poison_saga_does_not_hold_a_one_slot_bulkhead(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url, max_concurrency=1)
    await define(
        orchestrator,
        "narrow",
        [_with_headers(step("a", compensate=False), {"X-Name": "${input.name}"})],
    )
    poison = await start(orchestrator, "narrow", {"name": "Zoë"})
    began = time.monotonic()
    healthy = [await start(orchestrator, "narrow", {"name": f"ok-{i}"}) for i in range(3)]
    done = [await wait_terminal(orchestrator, s["id"], seconds=20) for s in healthy]
    took = time.monotonic() - began
    assert [s["status"] for s in done] == ["completed"] * 3, done
    # Far below a lease (3 s here): the poison saga never kept the only slot.
    assert took < 8, f"healthy sagas waited {took:.1f}s behind the poison one"
    poisoned = await wait_terminal(orchestrator, poison["id"], seconds=20)
    assert poisoned["status"] == "compensated"
    assert step_of(poisoned, "a")["attempts"] == 1


# --- an unexpected error in the engine ------------------------------------------------


@pytest.fixture
async def faulty(db_url: str) -> Any:
    """An orchestrator whose engine raises an unexpected error after every call."""
    settings = make_settings(SAGA_FAILPOINT="raise:after_send_before_commit", SAGA_LEASE_SECONDS=1)
    app = create_app(settings, db_url, run_executor=True)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
        yield client


async def test_an_engine_error_never_exceeds_the_attempts_and_the_saga_ends(
    faulty: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(faulty, participant.url)
    await define(faulty, "buggy", [step("a", retry=fast_retry(2), compensate=False)])
    saga = await start(faulty, "buggy", {})
    # Claim 1: attempt 1, error. Claim 2: attempt 2, error. Claim 3: no attempt is left,
    # so the cut-off attempt is judged failed (unknown outcome) and the saga unwinds.
    done = await wait_terminal(faulty, saga["id"], seconds=40)
    assert done["status"] == "compensated", done
    a = step_of(done, "a")
    assert a["attempts"] == 2 and len(participant.to("/a")) == 2, a
    kinds = [e["type"] for e in await events(faulty, saga["id"])]
    assert kinds.count("executor_error") == 2, kinds
    assert "attempts_exhausted" in kinds
    await _stays_put(db_url, saga["id"])


async def test_an_engine_error_that_repeats_parks_the_saga_for_an_operator(
    faulty: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(faulty, participant.url)
    await define(faulty, "buggy10", [step("a", retry=fast_retry(10), compensate=False)])
    saga = await start(faulty, "buggy10", {})
    done = await wait_terminal(faulty, saga["id"], seconds=40)
    assert done["status"] == "failed", done
    assert done["error"]["step"] == "a"
    assert "parked for an operator" in done["error"]["message"]
    assert step_of(done, "a")["attempts"] == 3  # CRASH_LIMIT errors in a row, then parked
    letters = await query(
        db_url,
        "SELECT step_name, direction FROM dead_letters WHERE saga_id = %(id)s",
        {"id": saga["id"]},
    )
    assert letters == [{"step_name": "a", "direction": "action"}]
    await _stays_put(db_url, saga["id"])


# --- 2. the pivot and the cancel -------------------------------------------------------


class Holding(Participant):
    """A participant that holds calls to one path until released."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.hold_path = path
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def _handle(self, request: Request) -> Response:
        if request.url.path == self.hold_path:
            self.arrived.set()
            await self.release.wait()
        return await super()._handle(request)


async def test_a_cancel_while_the_pivot_call_is_in_flight_is_refused(
    orchestrator: httpx.AsyncClient, db_url: str
) -> None:
    participant = Holding("/b")
    async with serve(participant.app) as base:
        await put_service(orchestrator, base)
        await define(orchestrator, "pivotal", [step("a"), step("b", pivot=True), step("c")])
        saga = await start(orchestrator, "pivotal", {})
        await asyncio.wait_for(participant.arrived.wait(), 20)
        r = await orchestrator.post(f"/v1/sagas/{saga['id']}/cancel")
        assert r.status_code == 409, r.text
        assert "pivot" in r.json()["detail"]
        participant.release.set()
        done = await wait_terminal(orchestrator, saga["id"], seconds=20)
    assert done["status"] == "completed", done
    assert done["cancel_requested"] is False
    assert all(s["status"] == "succeeded" for s in done["steps"]), done
    await _stays_put(db_url, saga["id"])


async def test_a_cancel_accepted_before_the_pivot_starts_keeps_it_from_starting(
    orchestrator: httpx.AsyncClient, db_url: str
) -> None:
    participant = Holding("/a")
    async with serve(participant.app) as base:
        await put_service(orchestrator, base)
        await define(orchestrator, "pivot2", [step("a"), step("b", pivot=True), step("c")])
        saga = await start(orchestrator, "pivot2", {})
        await asyncio.wait_for(participant.arrived.wait(), 20)
        r = await orchestrator.post(f"/v1/sagas/{saga['id']}/cancel")
        assert r.status_code == 202, r.text
        participant.release.set()
        done = await wait_terminal(orchestrator, saga["id"], seconds=20)
        assert done["status"] == "compensated", done
        assert done["error"]["kind"] == "cancelled"
        assert participant.to("/b") == [], "the pivot must not start after a cancel"
        assert [c.path for c in participant.calls] == ["/a", "/a/undo"]
    await _stays_put(db_url, saga["id"])


async def test_a_failed_saga_is_not_claimed_and_its_dead_letter_can_be_retried(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "afterpivot",
        [step("a"), step("b", pivot=True), step("c", retry=fast_retry(2))],
    )
    participant.script("/c", Reply(400, {"error": "no"}))
    saga = await run(orchestrator, "afterpivot", {})
    assert saga["status"] == "failed", saga
    (epoch_before,) = await query(
        db_url, "SELECT lease_epoch FROM sagas WHERE id = %(id)s", {"id": saga["id"]}
    )
    await _stays_put(db_url, saga["id"], seconds=3.5)  # more than a lease
    (epoch_after,) = await query(
        db_url, "SELECT lease_epoch FROM sagas WHERE id = %(id)s", {"id": saga["id"]}
    )
    assert epoch_after == epoch_before, "a failed saga was claimed again"
    (letter,) = await query(
        db_url, "SELECT id FROM dead_letters WHERE saga_id = %(id)s", {"id": saga["id"]}
    )
    r = await orchestrator.post(
        f"/v1/admin/dead-letters/{letter['id']}/retry",
        headers={"Authorization": "Bearer test-admin-token"},
    )
    assert r.status_code == 202, r.text
    done = await wait_terminal(orchestrator, saga["id"], seconds=20)
    assert done["status"] == "completed", done


# --- 4. a service change is seen by the next call --------------------------------------


async def test_a_service_change_is_seen_by_the_next_call(
    orchestrator: httpx.AsyncClient,
) -> None:
    old, new = Participant(), Participant()
    async with serve(old.app) as old_url, serve(new.app) as new_url:
        await put_service(orchestrator, old_url)
        await define(orchestrator, "moving", [step("a", compensate=False)])
        assert (await run(orchestrator, "moving", {}))["status"] == "completed"
        for round_ in range(5):
            target, other = (new, old) if round_ % 2 == 0 else (old, new)
            url = new_url if target is new else old_url
            seen_before = len(other.calls)
            await put_service(orchestrator, url)
            saga = await run(orchestrator, "moving", {})
            assert saga["status"] == "completed"
            assert len(other.calls) == seen_before, f"round {round_}: the old URL was called"


# --- 5. answers that could blow up memory ----------------------------------------------


def _bomb(size: int) -> bytes:
    """`size` bytes of zeros, gzipped: about a thousandth of that on the wire."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = b"\0" * (1 << 20)
    parts = [deflate.compress(chunk) for _ in range(size >> 20)]
    parts.append(deflate.flush())
    return b"".join(parts)


async def test_a_gzip_bomb_is_refused_while_decompressing(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    bomb = _bomb(200 << 20)  # 200 MiB of zeros in about 200 KB
    assert len(bomb) < 300_000
    participant.always(
        "/a",
        Reply(200, None, {"Content-Encoding": "gzip", "Content-Type": "application/json"}),
    )
    participant.raw_bodies["/a"] = bomb
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "bomb", [step("a")])
    saga = await run(orchestrator, "bomb", {})
    a = step_of(saga, "a")
    assert saga["status"] == "compensated", saga
    assert a["attempts"] == 1 and a["last_error"]["kind"] == "response_too_large", a
    assert a["response"] is None
    # The action happened (2xx): it is compensated.
    assert [c.path for c in participant.calls] == ["/a", "/a/undo"]


async def test_a_2xx_body_over_the_cap_is_a_final_failure_not_a_null_response(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/a", Reply(200, {"blob": "x" * (MAX_RESPONSE_BYTES + 10)}))
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator, "big", [step("a"), step("b", body={"id": "${steps.a.response.blob}"})]
    )
    saga = await run(orchestrator, "big", {})
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "response_too_large"
    assert step_of(saga, "a")["attempts"] == 1
    assert participant.to("/b") == []


async def test_a_non_2xx_body_over_the_cap_is_only_cut_short(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    participant.always("/a", Reply(400, {"blob": "x" * (MAX_RESPONSE_BYTES * 2)}))
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "bigerr", [step("a")])
    saga = await run(orchestrator, "bigerr", {})
    a = step_of(saga, "a")
    assert a["last_error"]["kind"] == "http_status" and a["status_code"] == 400, a


async def test_list_items_carry_no_inputs_or_step_responses(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "listed", [step("a", compensate=False)])
    saga = await run(orchestrator, "listed", {"big": "y" * 100_000})
    page = (await orchestrator.get("/v1/sagas", params={"limit": 500})).json()
    (item,) = page["items"]
    assert item["id"] == saga["id"] and item["status"] == "completed"
    assert "input" not in item
    assert all("response" not in s for s in item["steps"]), item
    assert item["steps"][0]["status"] == "succeeded"
    full = await get_saga(orchestrator, saga["id"])
    assert full["input"] == {"big": "y" * 100_000}
    assert full["steps"][0]["response"] is not None


async def test_the_saga_waits_visibly_not_forever_when_its_deadline_is_short(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """A hanging participant and a deadline: the saga ends by its deadline."""
    participant.always("/a", Reply(200, None, {}, 2))  # far past the 0.5 s timeout
    await put_service(
        orchestrator,
        participant.url,
        timeout_seconds=0.5,
        circuit_breaker={"failure_threshold": 1000},  # no breaker wait in this test
    )
    await define(orchestrator, "hangs", [step("a", retry=fast_retry(1000))], timeout_seconds=3)
    saga = await run(orchestrator, "hangs", {}, seconds=30)
    assert saga["status"] in ("compensated", "failed"), saga
    assert saga["error"]["kind"] == "deadline"
