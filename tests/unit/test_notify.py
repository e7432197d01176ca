"""Completion notifications, the pure parts: the target document, the request, what an
attempt's result means, and what an operator's retry of its dead letter may do."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from app.core import patterns
from app.core.deadletters import Refusal, plan_notify_retry
from app.core.definition import DefinitionSpec, NotifySpec, ServiceSpec, check_definition
from app.core.hosts import HostPolicy
from app.core.notify import after_attempt, notify_key, notify_request
from app.core.outcome import CallFailure, CallResult
from app.core.states import DeadLetterStatus, EventType, NotificationStatus, SagaStatus
from app.core.templates import TemplateError

SAGA = uuid.UUID("00000000-0000-4000-8000-000000000001")
FAST = {"max_attempts": 3, "initial_interval_seconds": 1, "max_interval_seconds": 10}


def spec(**fields: Any) -> NotifySpec:
    return NotifySpec.model_validate({"service": "hooks", "path": "/h", **fields})


# --- the document ------------------------------------------------------------------------


def test_defaults_follow_the_contract() -> None:
    retry = spec().retry
    assert (retry.max_attempts, retry.initial_interval_seconds, retry.max_interval_seconds) == (
        10,
        1.0,
        300.0,
    )
    assert retry.jitter


@pytest.mark.parametrize(
    "doc",
    [
        {"url": "http://h.example/${saga.id}"},
        {"service": "hooks", "path": "/h/${input.x}"},
        {"service": "hooks", "path": "/h", "headers": {"X-T": "${input.t}"}},
        {"service": "hooks", "path": "/h", "headers": {"X-Saga-Status": "done"}},
        {"service": "hooks", "path": "/h", "headers": {"Idempotency-Key": "mine"}},
        {"service": "hooks", "path": "/h", "url": "http://h.example/"},
        {"service": "hooks"},
        {"path": "/h"},
        {"service": "hooks", "path": "h"},
        {"url": "ftp://h.example/"},
        {"url": "http://user:pw@h.example/"},
        {"service": "hooks", "path": "/a b"},
        {"service": "hooks", "path": "/h", "body": {}},
        {"service": "hooks", "path": "/h", "method": "PUT"},
    ],
)
def test_refused_targets(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        NotifySpec.model_validate(doc)


def test_templates_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match=r"no \$\{…\} references"):
        NotifySpec.model_validate({"url": "http://h.example/${saga.id}"})


def test_the_patterns_say_what_the_validators_take() -> None:
    url, path = re.compile(patterns.NOTIFY_URL), re.compile(patterns.NOTIFY_PATH)
    value = re.compile(patterns.NOTIFY_HEADER_VALUE)
    assert url.match("https://h.example:8443/hooks?x=1")
    assert not url.match("https://h.example/${saga.id}")
    assert path.match("/hooks/done") and not path.match("/h/${x}") and not path.match("h")
    assert value.match("Bearer abc") and not value.match("${input.t}")


def test_a_definition_without_notify_keeps_its_hash() -> None:
    doc = {"name": "d", "steps": [{"name": "a", "action": {"url": "http://h.example/a"}}]}
    plain = DefinitionSpec.model_validate(doc)
    same = DefinitionSpec.model_validate({**doc, "notify": None})
    notified = DefinitionSpec.model_validate({**doc, "notify": {"url": "http://h.example/n"}})
    assert plain.content_hash() == same.content_hash() != notified.content_hash()


def test_check_definition_knows_services_and_hosts() -> None:
    doc = {"name": "d", "steps": [{"name": "a", "action": {"url": "http://h.example/a"}}]}
    unknown = DefinitionSpec.model_validate({**doc, "notify": {"service": "x", "path": "/n"}})
    (problem,) = check_definition(unknown, set(), HostPolicy.parse("*"))
    assert problem.loc == ("notify", "service") and "unknown service 'x'" in problem.msg
    refused = DefinitionSpec.model_validate({**doc, "notify": {"url": "http://10.0.0.5/n"}})
    problems = check_definition(refused, set(), HostPolicy.parse("*.example"))
    assert [p.loc for p in problems] == [("notify", "url")]


# --- the request -------------------------------------------------------------------------


def test_the_request_carries_the_contract_headers_and_the_view() -> None:
    service = ServiceSpec(base_url="http://hooks.example", headers={"X-Key": "k", "X-T": "svc"})
    notify = spec(headers={"X-T": "mine"})
    view = {"id": str(SAGA), "status": "completed"}
    request = notify_request(notify, service, SAGA, SagaStatus.COMPLETED, view)
    assert request.method == "POST" and request.url == "http://hooks.example/h"
    assert request.body == view
    assert request.headers["Idempotency-Key"] == notify_key(SAGA) == f"{SAGA}:notify"
    assert request.headers["X-Saga-Id"] == str(SAGA)
    assert request.headers["X-Saga-Status"] == "completed"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Key"] == "k" and request.headers["X-T"] == "mine"
    assert request.timeout_seconds == service.timeout_seconds


def test_a_vanished_service_cannot_be_notified() -> None:
    with pytest.raises(TemplateError):
        notify_request(spec(), None, SAGA, SagaStatus.FAILED, {})


# --- what an attempt means ----------------------------------------------------------------


def test_a_2xx_delivers() -> None:
    delivery = after_attempt(spec(retry=FAST), 1, CallResult(status_code=204))
    assert delivery.status is NotificationStatus.DELIVERED
    assert delivery.event is EventType.NOTIFICATION_DELIVERED
    assert not delivery.dead_letter and not delivery.breaker_failure


def test_a_retryable_failure_is_due_again_with_backoff() -> None:
    delivery = after_attempt(
        spec(retry=FAST), 1, CallResult(status_code=503), draw=lambda low, high: high
    )
    assert delivery.status is NotificationStatus.PENDING
    assert delivery.delay_seconds == 1.0 and delivery.event is None
    assert delivery.error is not None and delivery.error["status_code"] == 503
    assert delivery.breaker_failure


def test_retry_after_is_honoured_up_to_max_interval() -> None:
    result = CallResult(status_code=429, retry_after=7)
    assert after_attempt(spec(retry=FAST), 1, result).delay_seconds == 7
    result = CallResult(status_code=429, retry_after=700)
    assert after_attempt(spec(retry=FAST), 1, result).delay_seconds == 10


def test_the_last_attempt_fails_for_good_with_a_dead_letter() -> None:
    delivery = after_attempt(spec(retry=FAST), 3, CallResult(failure=CallFailure.TIMEOUT))
    assert delivery.status is NotificationStatus.FAILED
    assert delivery.event is EventType.NOTIFICATION_FAILED and delivery.dead_letter
    assert delivery.error is not None and delivery.error["kind"] == "timeout"


@pytest.mark.parametrize(
    "result",
    [
        CallResult(status_code=400),
        CallResult(failure=CallFailure.BLOCKED, message="not sent: 169.254.169.254"),
        CallResult(failure=CallFailure.TEMPLATE, message="cannot be built"),
    ],
)
def test_a_final_failure_fails_at_once(result: CallResult) -> None:
    delivery = after_attempt(spec(retry=FAST), 1, result)
    assert delivery.status is NotificationStatus.FAILED and delivery.dead_letter
    assert not delivery.breaker_failure  # the caller's fault, or nothing was sent


# --- an operator's retry ------------------------------------------------------------------


def test_a_notify_dead_letter_may_be_retried_once_while_the_saga_is_terminal() -> None:
    assert plan_notify_retry(DeadLetterStatus.OPEN, SagaStatus.COMPLETED) is None
    assert plan_notify_retry(DeadLetterStatus.RETRIED, SagaStatus.COMPLETED) == Refusal(
        True, "already retried"
    )
    discarded = plan_notify_retry(DeadLetterStatus.DISCARDED, SagaStatus.FAILED)
    assert isinstance(discarded, Refusal) and not discarded.already
    running = plan_notify_retry(DeadLetterStatus.OPEN, SagaStatus.RUNNING)
    assert isinstance(running, Refusal) and "running" in running.message


def test_the_store_and_the_engine_agree_on_the_wake_up_payload() -> None:
    from app.engine.notifier import NOTIFY_WAKE as ENGINE
    from app.store.sagas import NOTIFY_WAKE as STORE

    assert ENGINE == STORE
