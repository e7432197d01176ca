"""A completion notification's target (`notify`, on a definition or a start): the rules
of a step's call without templates, its headers and its retry policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import (
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.core import patterns
from app.core.definition import (
    _ABSENT,
    RESERVED_HEADERS,
    Document,
    Name,
    RetryPolicy,
    _check_headers,
    _check_url_text,
    _registering,
    check_http_url,
)
from app.core.hosts import HostPolicy, url_host_port

if TYPE_CHECKING:
    from app.core.definition import RuleViolation


def _default_notify_retry() -> RetryPolicy:
    return RetryPolicy(max_attempts=10, initial_interval_seconds=1.0, max_interval_seconds=300.0)


# A notification carries X-Saga-Status too: its headers may not set it either.
NOTIFY_RESERVED_HEADERS: frozenset[str] = RESERVED_HEADERS | {"x-saga-status"}
_NOTIFY_TEMPLATE = "is not rendered: a notification's target holds no ${…} references"
NotifyPath = Annotated[
    str,
    Field(
        max_length=2048,
        description="With `service`: starts with `/`, appended to its `base_url`; no `${…}`.",
        examples=["/hooks/saga-finished"],
        json_schema_extra={"pattern": patterns.NOTIFY_PATH},
    ),
]
NotifyUrl = Annotated[
    str,
    Field(
        max_length=2048,
        description="Instead of `service` + `path`: an absolute http(s) URL, no `${…}`; "
        "its host must be allowed by SAGA_ALLOWED_HOSTS (else `422`, `host-not-allowed`).",
        examples=["https://hooks.example.com/sagas"],
        json_schema_extra={"pattern": patterns.NOTIFY_URL},
    ),
]
NotifyHeaders = Annotated[
    dict[str, str],
    Field(
        default_factory=dict,
        max_length=64,
        description="Added to the service's headers; sent as written (no `${…}`).",
        json_schema_extra={
            "propertyNames": {"pattern": patterns.header_name(NOTIFY_RESERVED_HEADERS)},
            "additionalProperties": {"type": "string", "pattern": patterns.NOTIFY_HEADER_VALUE},
        },
    ),
]
NotifyRetry = Annotated[
    RetryPolicy,
    Field(
        default_factory=_default_notify_retry,
        description="How deliveries are retried; by default 10 attempts, 1 s doubling up "
        "to 300 s, full jitter.",
    ),
]
NOTIFY_DESCRIPTION = (
    "Where the saga's view is POSTed when the saga becomes terminal: `service` + `path`, "
    "or an absolute `url`."
)


class ServiceNotify(Document):
    """A notification to a registered service: `service` + `path`."""

    service: Name = Field(description="A registered service")
    path: NotifyPath
    url: None = Field(default=None, description=_ABSENT)
    headers: NotifyHeaders
    retry: NotifyRetry


class UrlNotify(Document):
    """A notification to an absolute `url`."""

    service: None = Field(default=None, description=_ABSENT)
    path: None = Field(default=None, description=_ABSENT)
    url: NotifyUrl
    headers: NotifyHeaders
    retry: NotifyRetry


class NotifySpec(Document):
    """A completion notification's target: `service` + `path`, or an absolute `url`
    (the rules of a step's call, without templates), its headers and retry policy.

    One model validates both; the document shows `ServiceNotify` and `UrlNotify` (`oneOf`).
    """

    service: Name | None = Field(default=None, description="A registered service")
    path: NotifyPath | None = None
    url: NotifyUrl | None = None
    headers: NotifyHeaders
    retry: NotifyRetry

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        shapes = [handler(m.__pydantic_core_schema__) for m in (ServiceNotify, UrlNotify)]
        return {"title": "NotifySpec", "description": NOTIFY_DESCRIPTION, "oneOf": shapes}

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if not _registering(info):
            return value
        for name, text in value.items():
            if name.lower() == "x-saga-status":
                raise ValueError(
                    f"header {name!r} is set by the orchestrator and cannot be configured"
                )
            if "${" in text:
                raise ValueError(f"header {name!r} {_NOTIFY_TEMPLATE}")
        return _check_headers(value)

    @field_validator("path", "url")
    @classmethod
    def _url_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _registering(info):
            return value
        if "${" in value:
            raise ValueError(f"{info.field_name} {_NOTIFY_TEMPLATE}")
        return _check_url_text(value, str(info.field_name))

    @model_validator(mode="after")
    def _target(self, info: ValidationInfo) -> NotifySpec:
        if self.url is not None:
            if self.service is not None or self.path is not None:
                raise ValueError("give either url, or service and path, not both")
            if _registering(info):
                check_http_url(self.url, "url")
        else:
            if self.service is None or self.path is None:
                raise ValueError("a notification needs service and path, or an absolute url")
            if not self.path.startswith("/"):
                raise ValueError("path must start with '/'")
        return self


def check_notify(
    notify: NotifySpec, loc: tuple[str | int, ...], known_services: set[str], hosts: HostPolicy
) -> list[RuleViolation]:
    """A notification target's rules that need the registry: a known service, an
    allowed host."""
    from app.core.definition import RuleViolation  # that module imports this one

    problems: list[RuleViolation] = []
    if notify.service is not None and notify.service not in known_services:
        problems.append(
            RuleViolation(
                (*loc, "service"),
                f"unknown service '{notify.service}': register it first (PUT /v1/services/…)",
            )
        )
    if notify.url is not None:
        decision = hosts.written(*url_host_port(notify.url))
        if decision.refused:
            problems.append(
                RuleViolation((*loc, "url"), f"{notify.url!r} is not allowed: {decision.reason}")
            )
    return problems
