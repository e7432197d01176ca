"""Turn a step's call spec into the HTTP request a participant receives."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.definition import (
    DEFAULT_STEP_TIMEOUT,
    CallSpec,
    ServiceSpec,
    check_http_url,
    header_value_problem,
)
from app.core.states import Direction
from app.core.templates import RenderContext, TemplateError, as_text, render, render_url


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A fully rendered participant call."""

    method: str
    url: str
    headers: dict[str, str]
    body: Any
    timeout_seconds: float

    def redacted(self, secret_headers: set[str]) -> dict[str, Any]:
        """The request as stored in a dead letter: secret header values masked."""
        secrets = {h.lower() for h in secret_headers} | {"authorization"}
        return {
            "method": self.method,
            "url": self.url,
            "headers": {
                k: ("[redacted]" if k.lower() in secrets else v) for k, v in self.headers.items()
            },
            "body": self.body,
        }


def attempt_timeout(step_timeout: float | None, service: ServiceSpec | None) -> float:
    """How long one attempt may take: the step's timeout, else its service's, else 10 s."""
    return step_timeout or (service.timeout_seconds if service else DEFAULT_STEP_TIMEOUT)


def idempotency_key(saga_id: uuid.UUID, step: str, direction: Direction) -> str:
    """The same key on every attempt of one step in one direction."""
    return f"{saga_id}:{step}:{direction.value}"


def _only_template_errors(build: Callable[..., HttpRequest]) -> Callable[..., HttpRequest]:
    """Whatever the data, nothing but TemplateError comes out of `build`: a value that
    makes an unexpected error is bad input for this step, never a crash of its task."""

    @functools.wraps(build)
    def guarded(*args: Any, **kwargs: Any) -> HttpRequest:
        try:
            return build(*args, **kwargs)
        except TemplateError:
            raise
        except Exception as exc:  # any other failure to build is the same kind of failure
            raise TemplateError(f"the request could not be built ({type(exc).__name__})") from None

    return guarded


@_only_template_errors
def build_request(
    *,
    call: CallSpec,
    service: ServiceSpec | None,
    step_name: str,
    step_timeout: float | None,
    direction: Direction,
    saga_id: uuid.UUID,
    context: RenderContext,
    request_id: str | None,
    deadline_at: datetime | None,
) -> HttpRequest:
    """Render templates and set the contract's headers; TemplateError if it cannot be built."""
    if call.url is not None:
        url = render_url(call.url, context)
    else:
        if service is None:
            raise TemplateError(f"service '{call.service}' is not registered")
        assert call.path is not None
        url = service.base_url + render_url(call.path, context)
    try:
        check_http_url(url, "the rendered url")
    except ValueError as exc:
        raise TemplateError(str(exc)) from None
    # Whether the host may be reached is the participant client's to decide, on the
    # addresses it resolves to when it connects (SAGA_ALLOWED_HOSTS).
    rendered_headers: Any = render(call.headers, context)
    step_headers = {str(k): _header_text(str(k), v) for k, v in rendered_headers.items()}
    overridden = {k.lower() for k in step_headers}
    service_headers = service.headers if service else {}
    headers = {
        k: _header_text(k, v) for k, v in service_headers.items() if k.lower() not in overridden
    }
    headers.update(step_headers)
    headers.update(
        {
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key(saga_id, step_name, direction),
            "X-Saga-Id": str(saga_id),
            "X-Saga-Step": step_name,
            "X-Request-ID": request_id or str(saga_id),
        }
    )
    if deadline_at is not None:
        headers["X-Saga-Deadline"] = deadline_at.isoformat()
    return HttpRequest(
        method=call.method,
        url=url,
        headers=headers,
        body=render(call.body, context),
        timeout_seconds=attempt_timeout(step_timeout, service),
    )


def _header_text(name: str, value: Any) -> str:
    text = as_text(value)
    problem = header_value_problem(text)
    if problem:
        raise TemplateError(f"header {name!r} {problem} after rendering; nothing was sent")
    return text
