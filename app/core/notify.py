"""Completion notifications, decided on plain values: the request a notification is, and
what one delivery attempt's result means for it (delivered, due again, or failed for
good with a dead letter).

The executor POSTs the saga's view (the body of `GET /v1/sagas/{id}`) to the target
once the saga is terminal, at least once, always with the same `Idempotency-Key`; a
notification never changes the saga's status.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

from app.core.breaker import counts_as_failure
from app.core.definition import NotifySpec, ServiceSpec, check_http_url
from app.core.outcome import CallResult, classify
from app.core.requests import HttpRequest, attempt_timeout
from app.core.retry import Draw, decide_retry
from app.core.states import EventType, NotificationStatus, SagaStatus
from app.core.templates import TemplateError


def notify_key(saga_id: uuid.UUID) -> str:
    """The same key on every delivery of a saga's notification, in every process."""
    return f"{saga_id}:notify"


def notify_request(
    notify: NotifySpec,
    service: ServiceSpec | None,
    saga_id: uuid.UUID,
    saga_status: SagaStatus,
    body: Any,
) -> HttpRequest:
    """The POST a notification is; TemplateError when it cannot be built (its service
    is gone, or the URL the service gives is not one)."""
    if notify.url is not None:
        url = notify.url
    else:
        if service is None:
            raise TemplateError(f"service '{notify.service}' is not registered")
        assert notify.path is not None
        url = service.base_url + notify.path
    try:
        check_http_url(url, "the notification url")
    except ValueError as exc:
        raise TemplateError(str(exc)) from None
    overridden = {k.lower() for k in notify.headers}
    headers = {
        k: v for k, v in (service.headers if service else {}).items() if k.lower() not in overridden
    }
    headers.update(notify.headers)
    headers.update(
        {
            "Content-Type": "application/json",
            "Idempotency-Key": notify_key(saga_id),
            "X-Saga-Id": str(saga_id),
            "X-Saga-Status": saga_status.value,
            "X-Request-ID": str(saga_id),
        }
    )
    return HttpRequest(
        method="POST",
        url=url,
        headers=headers,
        body=body,
        timeout_seconds=attempt_timeout(None, service),
    )


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery attempt leads to."""

    status: NotificationStatus  # delivered, pending (due again) or failed (for good)
    delay_seconds: float = 0.0  # pending: due again after this long
    event: EventType | None = None  # delivered / failed: the saga's history records it
    error: dict[str, Any] | None = None  # the attempt's error (the notification's last)
    dead_letter: bool = False  # failed for good: an operator's dead letter
    breaker_failure: bool = False  # the service's breaker counts this call as failed


def after_attempt(
    notify: NotifySpec, attempt: int, result: CallResult, draw: Draw = random.uniform
) -> Delivery:
    """A 2xx delivers; a retryable failure (per `notify.retry`, Retry-After honoured) is
    due again while attempts are left; anything else, or the last attempt, fails for good."""
    outcome = classify(result, notify.retry.retry_on_status)
    if outcome.success:
        return Delivery(NotificationStatus.DELIVERED, event=EventType.NOTIFICATION_DELIVERED)
    error = {
        "kind": outcome.error_kind.value if outcome.error_kind else None,
        "message": outcome.message,
        "status_code": result.status_code,
        "attempt": attempt,
        "direction": "notify",
    }
    failed = counts_as_failure(outcome)
    retry = decide_retry(notify.retry, attempt, outcome.retryable, result.retry_after, draw)
    if retry.retry:
        return Delivery(
            NotificationStatus.PENDING,
            delay_seconds=retry.delay_seconds,
            error=error,
            breaker_failure=failed,
        )
    return Delivery(
        NotificationStatus.FAILED,
        event=EventType.NOTIFICATION_FAILED,
        error=error,
        dead_letter=True,
        breaker_failure=failed,
    )
