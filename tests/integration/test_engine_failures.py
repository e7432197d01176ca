"""The engine's failure model: permanent and transient failures, Retry-After, unknown
outcomes, exhausted compensations, failure isolation, fallbacks, pivots, deadlines
and cancellation."""

from __future__ import annotations

import json
import time

import httpx

from app.main import create_app
from tests.conftest import ADMIN_TOKEN, make_settings, wait_terminal
from tests.support.engine_helpers import (
    define,
    events,
    fast_retry,
    get_saga,
    keys,
    paths,
    put_service,
    query,
    run,
    start,
    step,
    step_of,
    wait_until,
)
from tests.support.servers import Participant, Reply, serve


async def _dead_letters(db_url: str, saga_id: str) -> list[dict]:
    return await query(
        db_url,
        "SELECT * FROM dead_letters WHERE saga_id = %(id)s ORDER BY created_at",
        {"id": saga_id},
    )


# --- permanent failure ----------------------------------------------------------------


async def test_permanent_failure_compensates_completed_steps_in_reverse(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "three",
        [
            step("s1", compensation_body={"undo": "${steps.s1.response.id}"}),
            step("s2", compensation_body={"undo": "${steps.s2.response.id}"}),
            step("s3"),
        ],
    )
    participant.script("/s3", Reply(400, {"error": "card declined"}))
    saga = await run(orchestrator, "three", {})
    sid = saga["id"]

    assert saga["status"] == "compensated", saga
    assert saga["finished_at"] is not None
    err = saga["error"]
    assert err["step"] == "s3"
    assert err["kind"] == "http_status"
    assert isinstance(err["message"], str) and "400" in err["message"]

    # Forward, then unwinding in reverse; the failed step (4xx: outcome known) is not undone.
    assert paths(participant.calls) == ["/s1", "/s2", "/s3", "/s2/undo", "/s1/undo"]
    assert [s["status"] for s in saga["steps"]] == ["compensated", "compensated", "failed"]
    s3 = step_of(saga, "s3")
    assert s3["attempts"] == 1  # 400 is not retried
    assert s3["compensation_attempts"] == 0
    assert s3["status_code"] == 400
    assert s3["last_error"]["kind"] == "http_status"
    assert step_of(saga, "s1")["compensation_attempts"] == 1
    assert step_of(saga, "s2")["compensation_attempts"] == 1

    (undo2,) = participant.to("/s2/undo")
    (undo1,) = participant.to("/s1/undo")
    assert undo2.headers["idempotency-key"] == f"{sid}:s2:compensation"
    assert undo1.headers["idempotency-key"] == f"{sid}:s1:compensation"
    assert undo2.headers["x-saga-step"] == "s2"
    assert undo2.headers["x-saga-attempt"] == "1"
    assert undo2.body == {"undo": f"/s2-{sid}:s2:action"}
    assert undo1.body == {"undo": f"/s1-{sid}:s1:action"}

    types = [e["type"] for e in await events(orchestrator, sid)]
    assert "compensation_started" in types
    assert types[-1] == "saga_compensated"
    assert await _dead_letters(db_url, sid) == []


async def test_a_final_4xx_after_a_5xx_still_compensates_the_step(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """Once any attempt's outcome was unknown, the step may have happened."""
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "mixed", [step("s1"), step("s2", retry=fast_retry(3))])
    participant.script("/s2", Reply(502), Reply(400))
    saga = await run(orchestrator, "mixed", {})
    assert saga["status"] == "compensated", saga
    assert step_of(saga, "s2")["attempts"] == 2
    assert step_of(saga, "s2")["status_code"] == 400
    assert paths(participant.calls) == ["/s1", "/s2", "/s2", "/s2/undo", "/s1/undo"]


async def test_missing_template_path_fails_step_without_retry(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "tpl",
        [step("s1"), step("s2", body={"x": "${input.missing.deep}"}, retry=fast_retry(5))],
    )
    saga = await run(orchestrator, "tpl", {"present": 1})
    assert saga["status"] == "compensated", saga
    assert saga["error"]["step"] == "s2"
    assert saga["error"]["kind"] == "template"
    assert participant.to("/s2") == []  # never sent
    assert participant.to("/s2/undo") == []  # nothing happened, nothing to undo
    assert step_of(saga, "s2")["attempts"] == 1
    assert paths(participant.calls) == ["/s1", "/s1/undo"]


# --- transient failures and Retry-After ------------------------------------------------


async def test_transient_503s_then_success_keeps_the_key(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "flaky", [step("pay", retry=fast_retry(5)), step("ship")])
    participant.script("/pay", Reply(503), Reply(503))
    saga = await run(orchestrator, "flaky", {})
    sid = saga["id"]
    assert saga["status"] == "completed", saga
    pay = step_of(saga, "pay")
    assert pay["attempts"] == 3
    assert pay["status"] == "succeeded"
    assert pay["status_code"] == 200

    calls = participant.to("/pay")
    assert len(calls) == 3
    assert keys(calls) == [f"{sid}:pay:action"] * 3
    assert [c.headers["x-saga-attempt"] for c in calls] == ["1", "2", "3"]
    assert len({c.headers["x-request-id"] for c in calls}) == 1
    assert participant.to("/pay/undo") == []

    finished = [
        e
        for e in await events(orchestrator, sid)
        if e["type"] == "attempt_finished" and e["step"] == "pay"
    ]
    assert [(e["attempt"], e["outcome"], e["status_code"]) for e in finished] == [
        (1, "retryable", 503),
        (2, "retryable", 503),
        (3, "succeeded", 200),
    ]


async def test_retry_after_delays_the_next_attempt(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "later",
        [step("pay", retry=fast_retry(3, max_interval_seconds=10))],
    )
    participant.script("/pay", Reply(503, headers={"Retry-After": "1"}))
    saga = await run(orchestrator, "later", {})
    assert saga["status"] == "completed", saga
    first, second = participant.to("/pay")
    # Without Retry-After the policy would retry after 0.05 s.
    assert second.at - first.at >= 0.9, second.at - first.at


async def test_retry_after_is_capped_by_max_interval(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "capped",
        [step("pay", retry=fast_retry(3, max_interval_seconds=0.5))],
    )
    participant.script("/pay", Reply(429, headers={"Retry-After": "3600"}))
    saga = await run(orchestrator, "capped", {}, seconds=60)
    assert saga["status"] == "completed", saga
    first, second = participant.to("/pay")
    assert second.at - first.at < 30, second.at - first.at


# --- unknown outcome: the failed step is compensated too -------------------------------


async def test_timeouts_exhausted_compensate_the_failed_step_too(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "slowpay",
        [
            step("s1"),
            step("s2", timeout_seconds=0.3, retry=fast_retry(2)),
            step("s3"),
        ],
    )
    participant.always("/s2", Reply(delay=1.0))
    saga = await run(orchestrator, "slowpay", {})
    sid = saga["id"]
    assert saga["status"] == "compensated", saga
    assert saga["error"]["step"] == "s2"
    assert saga["error"]["kind"] == "timeout"
    s2 = step_of(saga, "s2")
    assert s2["attempts"] == 2
    assert s2["status"] == "compensated"
    assert s2["last_error"] is not None and s2["last_error"]["kind"] == "timeout"
    assert step_of(saga, "s1")["status"] == "compensated"
    assert step_of(saga, "s3")["status"] == "pending"

    s2_calls = participant.to("/s2")
    assert len(s2_calls) == 2
    assert keys(s2_calls) == [f"{sid}:s2:action"] * 2
    assert [c.headers["x-saga-attempt"] for c in s2_calls] == ["1", "2"]
    undo = [c.path for c in participant.calls if c.path.endswith("/undo")]
    assert undo == ["/s2/undo", "/s1/undo"]
    assert participant.to("/s3") == []

    history = await events(orchestrator, sid)
    s2_finished = [
        e
        for e in history
        if e["type"] == "attempt_finished" and e["step"] == "s2" and e["direction"] == "action"
    ]
    assert [(e["outcome"], e["error_kind"], e["status_code"]) for e in s2_finished] == [
        ("retryable", "timeout", None),
        ("failed", "timeout", None),
    ]
    assert all(e["message"] for e in s2_finished)
    assert all(e["duration_ms"] >= 250 for e in s2_finished)  # waited for the 0.3 s timeout
    undone = [
        (e["step"], e["outcome"])
        for e in history
        if e["type"] == "attempt_finished" and e["direction"] == "compensation"
    ]
    assert undone == [("s2", "succeeded"), ("s1", "succeeded")]


async def test_5xx_exhausted_compensates_the_failed_step_too(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "brokenpay", [step("s1"), step("s2", retry=fast_retry(2))])
    participant.always("/s2", Reply(500, {"error": "boom"}))
    saga = await run(orchestrator, "brokenpay", {})
    assert saga["status"] == "compensated", saga
    assert saga["error"]["step"] == "s2"
    assert saga["error"]["kind"] == "http_status"
    assert step_of(saga, "s2")["attempts"] == 2
    assert step_of(saga, "s2")["status"] == "compensated"
    assert step_of(saga, "s2")["status_code"] == 500
    assert paths(participant.calls) == ["/s1", "/s2", "/s2", "/s2/undo", "/s1/undo"]
    (undo,) = participant.to("/s2/undo")
    assert undo.headers["idempotency-key"] == f"{saga['id']}:s2:compensation"


# --- compensation exhausted ------------------------------------------------------------


async def test_compensation_exhausted_parks_a_dead_letter(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url, headers={"X-Api-Key": "super-secret-key-123"})
    s1 = step("s1", compensation_retry=fast_retry(2))
    s1["compensation"]["headers"] = {"Authorization": "Bearer tok-secret-456"}
    await define(orchestrator, "stuck", [s1, step("s2")])
    participant.always("/s1/undo", Reply(500, {"error": "refunds down"}))
    participant.script("/s2", Reply(409, {"error": "conflict"}))
    saga = await run(orchestrator, "stuck", {})
    sid = saga["id"]

    assert saga["status"] == "failed", saga
    assert saga["finished_at"] is not None
    # The saga's error still says what made it unwind.
    assert saga["error"]["step"] == "s2"
    assert saga["error"]["kind"] == "http_status"
    s1_view = step_of(saga, "s1")
    assert s1_view["status"] == "compensation_failed"
    assert s1_view["compensation_attempts"] == 2
    assert s1_view["last_error"]["kind"] == "http_status"
    assert step_of(saga, "s2")["status"] == "failed"
    undo_calls = participant.to("/s1/undo")
    assert len(undo_calls) == 2
    assert keys(undo_calls) == [f"{sid}:s1:compensation"] * 2
    assert [c.headers["x-saga-attempt"] for c in undo_calls] == ["1", "2"]
    assert undo_calls[0].headers["x-api-key"] == "super-secret-key-123"

    letters = await _dead_letters(db_url, sid)
    assert len(letters) == 1, letters
    (dl,) = letters
    assert dl["direction"] == "compensation"
    assert dl["status"] == "open"
    assert dl["step_name"] == "s1"
    assert dl["step_idx"] == 0
    assert dl["service"] == "svc"
    assert dl["attempts"] == 2
    assert dl["definition_name"] == "stuck"
    assert dl["last_error"]["status_code"] == 500
    request = dl["request"]
    assert request["method"] == "POST"
    assert request["url"] == participant.url + "/s1/undo"
    assert request["body"] == {"saga": sid}
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["idempotency-key"] == f"{sid}:s1:compensation"
    assert headers["x-api-key"] != "super-secret-key-123"
    assert headers["authorization"] != "Bearer tok-secret-456"
    dumped = json.dumps(dl, default=str)
    assert "super-secret-key-123" not in dumped
    assert "tok-secret-456" not in dumped

    # The operator's view shows the same dead letter, without the secrets.
    r = await orchestrator.get(
        "/v1/admin/dead-letters",
        params={"status": "open"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["saga_id"] == sid
    assert item["direction"] == "compensation"
    assert item["step"] == "s1"
    assert "super-secret-key-123" not in r.text
    assert "tok-secret-456" not in r.text

    history = await events(orchestrator, sid)
    assert history[-1]["type"] == "saga_failed"
    undo_outcomes = [
        e["outcome"]
        for e in history
        if e["type"] == "attempt_finished" and e["direction"] == "compensation"
    ]
    assert undo_outcomes == ["retryable", "failed"]


# --- failure isolation and fallbacks ---------------------------------------------------


async def test_non_critical_failure_is_isolated(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "isolated",
        [
            step("s1"),
            step("email", critical=False, retry=fast_retry(2)),
            step("s3", body={"from_s1": "${steps.s1.response.id}"}),
        ],
    )
    participant.always("/email", Reply(503))
    saga = await run(orchestrator, "isolated", {})
    sid = saga["id"]
    assert saga["status"] == "completed", saga
    assert saga["error"] is None
    assert [s["status"] for s in saga["steps"]] == ["succeeded", "failed", "succeeded"]
    assert step_of(saga, "email")["attempts"] == 2
    assert step_of(saga, "email")["last_error"]["kind"] == "http_status"
    assert len(participant.to("/s3")) == 1
    assert not any(c.path.endswith("/undo") for c in participant.calls)

    letters = await _dead_letters(db_url, sid)
    assert len(letters) == 1, letters
    assert letters[0]["direction"] == "action"
    assert letters[0]["step_name"] == "email"
    assert letters[0]["status"] == "open"
    assert letters[0]["attempts"] == 2


async def test_unknown_outcome_of_a_non_critical_step_is_undone_on_unwind(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "isolated2",
        [
            step("s1"),
            step("email", critical=False, retry=fast_retry(1)),
            step("sms", critical=False, retry=fast_retry(1)),
            step("s4"),
        ],
    )
    participant.always("/email", Reply(503))  # may have been sent
    participant.always("/sms", Reply(400))  # certainly not sent
    participant.always("/s4", Reply(400))
    saga = await run(orchestrator, "isolated2", {})
    assert saga["status"] == "compensated", saga
    assert saga["error"]["step"] == "s4"
    assert [s["status"] for s in saga["steps"]] == [
        "compensated",
        "compensated",
        "failed",
        "failed",
    ]
    undo = [c.path for c in participant.calls if c.path.endswith("/undo")]
    assert undo == ["/email/undo", "/s1/undo"]


async def test_fallback_response_replaces_the_failed_step(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    fallback = {"id": "fb-1", "tier": "basic", "score": 0}
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "fallback",
        [
            step("s1"),
            step("quote", fallback={"response": fallback}),
            step(
                "s3",
                body={"quote": "${steps.quote.response.id}", "all": "${steps.quote.response}"},
            ),
        ],
    )
    participant.always("/quote", Reply(400))
    saga = await run(orchestrator, "fallback", {})
    sid = saga["id"]
    assert saga["status"] == "completed", saga
    quote = step_of(saga, "quote")
    assert quote["status"] == "fallback"
    assert quote["response"] == fallback
    (s3,) = participant.to("/s3")
    assert s3.body == {"quote": "fb-1", "all": fallback}
    assert not any(c.path.endswith("/undo") for c in participant.calls)
    assert "fallback_used" in [e["type"] for e in await events(orchestrator, sid)]
    assert await _dead_letters(db_url, sid) == []


# --- pivot -----------------------------------------------------------------------------


async def test_failure_after_pivot_parks_without_compensating(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "pivoted",
        [step("a"), step("b", pivot=True), step("c", retry=fast_retry(2))],
    )
    participant.always("/c", Reply(400))
    saga = await run(orchestrator, "pivoted", {})
    sid = saga["id"]
    assert saga["status"] == "failed", saga
    assert saga["error"]["step"] == "c"
    assert saga["error"]["kind"] == "http_status"
    assert [s["status"] for s in saga["steps"]] == ["succeeded", "succeeded", "failed"]
    assert not any(c.path.endswith("/undo") for c in participant.calls)

    letters = await _dead_letters(db_url, sid)
    assert len(letters) == 1, letters
    assert letters[0]["step_name"] == "c"
    assert letters[0]["direction"] == "action"
    assert letters[0]["status"] == "open"

    assert (await events(orchestrator, sid))[-1]["type"] == "saga_failed"

    # Past the pivot, a saga cannot be cancelled (and this one is terminal anyway).
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 409


async def test_failure_after_pivot_is_retried_by_policy_first(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "pivoted5xx",
        [step("a"), step("b", pivot=True), step("c", retry=fast_retry(3))],
    )
    participant.always("/c", Reply(503))
    saga = await run(orchestrator, "pivoted5xx", {})
    assert saga["status"] == "failed", saga
    assert step_of(saga, "c")["attempts"] == 3
    assert len(participant.to("/c")) == 3
    # Even with an unknown outcome, nothing is compensated past the pivot.
    assert not any(c.path.endswith("/undo") for c in participant.calls)
    letters = await _dead_letters(db_url, saga["id"])
    assert [(dl["step_name"], dl["direction"], dl["attempts"]) for dl in letters] == [
        ("c", "action", 3)
    ]


async def test_pivot_step_failing_compensates_earlier_steps(
    orchestrator: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "pivotfail", [step("a"), step("b", pivot=True), step("c")])
    participant.always("/b", Reply(422))
    saga = await run(orchestrator, "pivotfail", {})
    assert saga["status"] == "compensated", saga
    assert saga["error"]["step"] == "b"
    assert [s["status"] for s in saga["steps"]] == ["compensated", "failed", "pending"]
    assert paths(participant.calls) == ["/a", "/b", "/a/undo"]
    assert await _dead_letters(db_url, saga["id"]) == []


# --- deadline --------------------------------------------------------------------------


async def test_deadline_stops_retrying_and_compensates(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "hurry",
        [
            step("s1"),
            step(
                "s2",
                retry={
                    "max_attempts": 50,
                    "initial_interval_seconds": 5,
                    "max_interval_seconds": 60,
                    "jitter": False,
                },
            ),
        ],
        timeout_seconds=1,
    )
    participant.always("/s2", Reply(503))
    began = time.monotonic()
    saga = await run(orchestrator, "hurry", {}, seconds=60)
    elapsed = time.monotonic() - began
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "deadline"
    assert saga["error"]["step"] == "s2"
    assert step_of(saga, "s1")["status"] == "compensated"
    # The 503 may have been applied: s2 is undone as well.
    assert step_of(saga, "s2")["status"] == "compensated"
    assert participant.to("/s2/undo") and participant.to("/s1/undo")
    # The 5 s backoff is cut short by the 1 s deadline.
    assert len(participant.to("/s2")) <= 2
    assert elapsed < 30, elapsed
    assert participant.to("/s1")[0].headers.get("x-saga-deadline")


# --- cancel ----------------------------------------------------------------------------


async def test_cancel_a_saga_waiting_on_a_retry(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "cancellable",
        [
            step("s1"),
            step(
                "s2",
                retry={
                    "max_attempts": 5,
                    "initial_interval_seconds": 10,
                    "max_interval_seconds": 60,
                    "jitter": False,
                },
            ),
            step("s3"),
        ],
    )
    participant.always("/s2", Reply(503))
    saga = await start(orchestrator, "cancellable", {})
    sid = saga["id"]

    async def waiting_on_retry() -> bool:
        view = await get_saga(orchestrator, sid)
        s2 = step_of(view, "s2")
        return s2["attempts"] == 1 and s2["last_error"] is not None

    await wait_until(waiting_on_retry, seconds=30, what="s2 waiting on its retry")
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 202, r.text
    assert r.json()["id"] == sid
    assert r.json()["cancel_requested"] is True

    saga = await wait_terminal(orchestrator, sid, seconds=60)
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "cancelled"
    assert step_of(saga, "s1")["status"] == "compensated"
    assert step_of(saga, "s2")["status"] == "compensated"  # 503: outcome unknown
    assert step_of(saga, "s3")["status"] == "pending"
    # Cancelled before the 10 s retry came due: s2 was tried once only.
    assert len(participant.to("/s2")) == 1
    undo = [c.path for c in participant.calls if c.path.endswith("/undo")]
    assert undo == ["/s2/undo", "/s1/undo"]
    assert "cancel_requested" in [e["type"] for e in await events(orchestrator, sid)]

    # Cancelling a terminal saga is a conflict, as problem+json.
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == 409
    assert problem["title"] and problem["detail"]


async def test_cancel_during_an_in_flight_call_compensates_after_it(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "midcall", [step("s1"), step("s2"), step("s3")])
    participant.always("/s2", Reply(delay=1.5))
    saga = await start(orchestrator, "midcall", {})
    sid = saga["id"]
    await wait_until(lambda: participant.to("/s2"), seconds=30, what="s2 in flight")
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 202, r.text
    saga = await wait_terminal(orchestrator, sid, seconds=60)
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "cancelled"
    assert participant.to("/s3") == []
    assert [s["status"] for s in saga["steps"]] == ["compensated", "compensated", "pending"]
    undo = [c.path for c in participant.calls if c.path.endswith("/undo")]
    assert undo == ["/s2/undo", "/s1/undo"]


async def test_cancel_during_a_call_that_then_asks_for_a_retry(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "midretry",
        [
            step("s1"),
            step(
                "s2",
                retry={
                    "max_attempts": 5,
                    "initial_interval_seconds": 10,
                    "max_interval_seconds": 60,
                    "jitter": False,
                },
            ),
        ],
    )
    participant.always("/s2", Reply(503, delay=1.5))
    saga = await start(orchestrator, "midretry", {})
    sid = saga["id"]
    await wait_until(lambda: participant.to("/s2"), seconds=30, what="s2 in flight")
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 202, r.text
    began = time.monotonic()
    saga = await wait_terminal(orchestrator, sid, seconds=60)
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "cancelled"
    # The cancel made the saga due at once instead of after the 10 s backoff.
    assert len(participant.to("/s2")) == 1
    assert time.monotonic() - began < 9
    undo = [c.path for c in participant.calls if c.path.endswith("/undo")]
    assert undo == ["/s2/undo", "/s1/undo"]


async def test_cancel_past_the_pivot_is_refused(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "nocancel",
        [
            step("a"),
            step("b", pivot=True),
            step(
                "c",
                retry={
                    "max_attempts": 2,
                    "initial_interval_seconds": 2,
                    "max_interval_seconds": 2,
                    "jitter": False,
                },
            ),
        ],
    )
    participant.script("/c", Reply(503))
    saga = await start(orchestrator, "nocancel", {})
    sid = saga["id"]
    await wait_until(lambda: participant.to("/c"), seconds=30, what="c called")
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    saga = await wait_terminal(orchestrator, sid, seconds=60)
    assert saga["status"] == "completed", saga
    assert saga["cancel_requested"] is False
    assert not any(c.path.endswith("/undo") for c in participant.calls)


async def test_cancel_before_any_step_ran_calls_nobody(
    api: httpx.AsyncClient, participant: Participant, db_url: str
) -> None:
    await put_service(api, participant.url)
    await define(api, "early", [step("s1"), step("s2")])
    saga = await start(api, "early", {})
    sid = saga["id"]
    r = await api.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "running"
    assert r.json()["cancel_requested"] is True

    # Only now does an executor see the saga.
    app = create_app(make_settings(), db_url, run_executor=True)
    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=40) as client:
        saga = await wait_terminal(client, sid, seconds=60)
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "cancelled"
    assert [s["status"] for s in saga["steps"]] == ["pending", "pending"]
    assert participant.calls == []


async def test_cancel_unknown_saga_is_404(orchestrator: httpx.AsyncClient) -> None:
    r = await orchestrator.post("/v1/sagas/00000000-0000-4000-8000-000000000000/cancel")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 404
    r = await orchestrator.post("/v1/sagas/not-a-uuid/cancel")
    assert 400 <= r.status_code < 500


# --- contract edges ----------------------------------------------------------------------


async def test_cancel_accepted_during_the_last_call_still_compensates(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """A 202 to a cancel means "stops forward progress and compensates" (contract §5),
    also when the call in flight at that moment is the saga's last one."""
    await put_service(orchestrator, participant.url)
    await define(orchestrator, "lastcall", [step("s1"), step("s2")])
    participant.always("/s2", Reply(delay=1.5))
    saga = await start(orchestrator, "lastcall", {})
    sid = saga["id"]
    await wait_until(lambda: participant.to("/s2"), seconds=30, what="s2 in flight")
    r = await orchestrator.post(f"/v1/sagas/{sid}/cancel")
    assert r.status_code == 202, r.text
    saga = await wait_terminal(orchestrator, sid, seconds=60)
    assert saga["status"] == "compensated", saga
    assert saga["error"]["kind"] == "cancelled"


async def test_timed_out_step_is_compensated_even_if_its_compensation_uses_its_response(
    orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """Contract §6: a step whose outcome is unknown (timeout) is compensated too, and the
    participant makes that a no-op. The contract's own checkout example builds the refund
    from ${steps.charge_payment.response.id}, which a timed-out charge does not have."""
    await put_service(orchestrator, participant.url)
    await define(
        orchestrator,
        "refund",
        [
            step(
                "charge",
                timeout_seconds=0.3,
                retry=fast_retry(1),
                compensation_body={"charge_id": "${steps.charge.response.id}"},
            )
        ],
    )
    participant.always("/charge", Reply(delay=1.0))
    saga = await run(orchestrator, "refund", {})
    assert saga["status"] == "compensated", saga
    (refund,) = participant.to("/charge/undo")
    assert refund.headers["idempotency-key"] == f"{saga['id']}:charge:compensation"
