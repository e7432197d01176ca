"""The definition and service documents: shape, defaults and cross-field rules.

Pydantic checks the shape of each document; `check_definition` adds the rules that
need the whole document or the registry (template references, known services,
allowed hosts, one pivot). Both are pure, so every rule is unit-testable.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.core import patterns
from app.core.hosts import HostPolicy, url_host_port
from app.core.templates import TemplateError, iter_refs, strip_refs

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
MAX_JSON_DEPTH = 64
DEFAULT_RETRY_ON_STATUS = (408, 425, 429, 500, 502, 503, 504)
DEFAULT_STEP_TIMEOUT = 10.0
# Headers the orchestrator owns; a definition or service may not override them.
RESERVED_HEADERS: frozenset[str] = frozenset(
    {
        "idempotency-key",
        "x-saga-id",
        "x-saga-step",
        "x-saga-attempt",
        "x-saga-deadline",
        "x-request-id",
        "content-type",
        "content-length",
        "host",
        "traceparent",
    }
)

Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["checkout"])]
# Definition and step fields added after v1, with their defaults (see `content_hash`).
ADDED_FIELDS: dict[str, Any] = {"exclusive": False, "notify": None}
ADDED_STEP_FIELDS: dict[str, Any] = {"callback": None}
MAX_CALLBACK_TIMEOUT = 604800  # seven days


def _pattern_with_length(pattern: str) -> Callable[[dict[str, Any]], None]:
    """`pattern` with the field's `maxLength` folded into it as a lookahead: the same
    strings, but a generator need not build a string of that length that matches."""

    def extra(schema: dict[str, Any]) -> None:
        limit = schema.pop("maxLength")
        schema["pattern"] = f"^(?=.{{0,{limit}}}$)" + pattern.removeprefix("^")

    return extra


def _headers_schema(value: str) -> dict[str, Any]:
    """The schema of a `headers` map: what `_check_headers` accepts, as patterns."""
    return {
        "propertyNames": {"pattern": patterns.header_name(RESERVED_HEADERS)},
        "additionalProperties": {"type": "string", "pattern": value},
    }


def check_json(value: Any, where: str = "body", depth: int = 0) -> None:
    """Reject what PostgreSQL's jsonb cannot store or what no sane document needs."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where} contains a NUL character (\\u0000), which is not allowed")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{where} contains an unpaired UTF-16 surrogate, which is not valid Unicode"
            ) from None
    elif isinstance(value, list):
        for item in value:
            check_json(item, where, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_json(key, where, depth + 1)
            check_json(item, where, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} contains {value}, which is not a JSON number")


class Document(BaseModel):
    """Base of every request document: unknown fields and NUL characters are refused."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        check_json(data, "the document")
        return data


def header_value_problem(value: str, written: str | None = None) -> str | None:
    """Why `value` cannot be sent as an HTTP header value, or None when it can.

    One rule for registration (static values) and render time (templated ones): visible
    ASCII, with spaces and tabs only between visible characters. HTTP clients refuse
    anything else (non-ASCII raises an encoding error, a newline would split the header,
    edge whitespace is a protocol error), so it must never reach one. `written` is the
    text of a template without its references: only that is checked character by
    character at registration.
    """
    for char in value if written is None else written:
        if char == "\t" or " " <= char <= "~":
            continue
        if char > "~" and char != "\x7f":
            return "has a non-ASCII character in its value (headers are ASCII only)"
        return "has control characters in its value"
    if value != value.strip(" \t"):
        return "has leading or trailing whitespace in its value, which HTTP does not carry"
    return None


# Validation context for documents read back from the database: they passed the rules
# in force when they were registered; rules added since must not make them unreadable
# (what they render to is still checked when a request is built).
STORED: dict[str, Any] = {"stored": True}


def _registering(info: ValidationInfo) -> bool:
    return not (isinstance(info.context, dict) and info.context.get("stored"))


def _check_headers(headers: dict[str, str], templated: bool = False) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is set by the orchestrator and cannot be configured")
        # In a call's headers only the written text is checked here; what a template
        # renders to is checked when the request is built.
        problem = header_value_problem(value, strip_refs(value) if templated else None)
        if problem:
            raise ValueError(f"header {name!r} {problem}")
    return headers


def _check_url_text(value: str, field: str) -> str:
    """The written part of a path or url: no spaces or control characters (a template
    may still interpolate anything; its values are percent-encoded when rendered)."""
    if any(c <= " " or c == "\x7f" for c in strip_refs(value)):
        raise ValueError(f"{field} has spaces or control characters: percent-encode them")
    return value


class CircuitBreakerConfig(Document):
    failure_threshold: int = Field(default=5, ge=1, le=1000)
    recovery_timeout_seconds: float = Field(default=30.0, gt=0, le=86400)
    half_open_max_calls: int = Field(default=1, ge=1, le=1000)


class ServiceSpec(Document):
    """`PUT /v1/services/{name}` body."""

    base_url: str = Field(
        max_length=2048,
        examples=["http://127.0.0.1:9001"],
        description="An absolute http(s) URL with a host and no credentials, at most 2048 "
        "characters; its host must be allowed by SAGA_ALLOWED_HOSTS (else `422`, "
        "`host-not-allowed`).",
        json_schema_extra=_pattern_with_length(patterns.HTTP_URL),
    )
    timeout_seconds: float = Field(default=DEFAULT_STEP_TIMEOUT, gt=0, le=600)
    max_concurrency: int = Field(default=20, ge=1, le=10000)
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    headers: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Sent with every call to the service; values are secrets, never echoed.",
        json_schema_extra=_headers_schema(patterns.HEADER_VALUE),
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if _registering(info):
            check_http_url(value, "base_url")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        return _check_headers(value) if _registering(info) else value


def check_http_url(value: str, field: str) -> None:
    """Only absolute http(s) URLs with a host; no credentials in the URL."""
    if any(c <= " " or c == "\x7f" for c in value):
        raise ValueError(f"{field} has spaces or control characters: percent-encode them")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{field} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{field} must use http or https, not {parts.scheme or 'no scheme'!r}")
    if not parts.hostname:
        raise ValueError(f"{field} must include a host")
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValueError(f"{field} must not carry credentials; use service headers")
    if not valid_host(parts.hostname):
        raise ValueError(f"{field} has {parts.hostname!r} as its host, which is not a host name")
    del port


_DNS_NAME = re.compile(
    r"^(?=.{1,253}\.?$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)


def valid_host(host: str) -> bool:
    """An IP address or a DNS name (letters, digits, `-`, `_`, dots; already lowercased
    by urlsplit). Anything else (`%`, spaces, unicode) is refused before any lookup."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _DNS_NAME.match(host) is not None


_SUCCESS = {"minimum": 200, "maximum": 299}  # a 2xx is a success: never retried


class RetryPolicy(Document):
    """When to try again. `max_interval_seconds` may not be below
    `initial_interval_seconds` (`422`)."""

    max_attempts: int = Field(default=3, ge=1, le=1000)
    initial_interval_seconds: float = Field(default=1.0, gt=0, le=86400)
    backoff_coefficient: float = Field(default=2.0, ge=1.0, le=100)
    max_interval_seconds: float = Field(default=60.0, gt=0, le=86400)
    jitter: bool = True
    retry_on_status: list[
        Annotated[int, Field(ge=100, le=599, json_schema_extra={"not": _SUCCESS})]
    ] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON_STATUS), max_length=100)

    @model_validator(mode="after")
    def _interval_order(self) -> RetryPolicy:
        if self.max_interval_seconds < self.initial_interval_seconds:
            raise ValueError("max_interval_seconds must be >= initial_interval_seconds")
        if any(200 <= s < 300 for s in self.retry_on_status):
            raise ValueError("retry_on_status cannot contain a 2xx status")
        return self


def _default_compensation_retry() -> RetryPolicy:
    return RetryPolicy(max_attempts=10)


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]


CallPath = Annotated[
    str,
    Field(
        max_length=2048,
        description="With `service`: starts with `/`, appended to its `base_url`; may hold "
        "`${…}` references (each rendered value is percent-encoded).",
        examples=["/charges"],
        json_schema_extra={"pattern": patterns.CALL_PATH},
    ),
]
CallUrl = Annotated[
    str,
    Field(
        max_length=2048,
        description="Instead of `service` + `path`: an absolute http(s) URL; `${…}` "
        "references only in its path and query.",
        examples=["http://127.0.0.1:9002/hooks/${saga.id}"],
        json_schema_extra={"pattern": patterns.CALL_URL},
    ),
]
CallHeaders = Annotated[
    dict[str, str],
    Field(
        default_factory=dict,
        max_length=64,
        description="Added to the service's headers; values may hold `${…}` references.",
        json_schema_extra=_headers_schema(patterns.CALL_HEADER_VALUE),
    ),
]
CallBody = Annotated[Any, Field(default=None, description="Any JSON; may hold `${…}`.")]
_ABSENT = "Absent (or null) here."
CALL_DESCRIPTION = "One HTTP call: `service` + `path`, or an absolute `url`."


class ServiceCall(Document):
    """A call to a registered service: `service` + `path`."""

    service: Name = Field(description="A registered service")
    path: CallPath
    url: None = Field(default=None, description=_ABSENT)
    method: HttpMethod = "POST"
    headers: CallHeaders
    body: CallBody


class UrlCall(Document):
    """A call to an absolute `url`."""

    service: None = Field(default=None, description=_ABSENT)
    path: None = Field(default=None, description=_ABSENT)
    url: CallUrl
    method: HttpMethod = "POST"
    headers: CallHeaders
    body: CallBody


class CallSpec(Document):
    """One HTTP call: `service` + `path`, or an absolute `url`.

    One model validates both; the document shows the two shapes a client builds,
    `ServiceCall` and `UrlCall` (`oneOf`), which are only schemas.
    """

    service: Name | None = Field(default=None, description="A registered service")
    path: CallPath | None = None
    url: CallUrl | None = None
    method: HttpMethod = "POST"
    headers: CallHeaders
    body: CallBody

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        shapes = [handler(m.__pydantic_core_schema__) for m in (ServiceCall, UrlCall)]
        return {"title": "CallSpec", "description": CALL_DESCRIPTION, "oneOf": shapes}

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        return _check_headers(value, templated=True) if _registering(info) else value

    @field_validator("path", "url")
    @classmethod
    def _url_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not _registering(info):
            return value
        return _check_url_text(value, str(info.field_name))

    @model_validator(mode="after")
    def _target(self, info: ValidationInfo) -> CallSpec:
        if self.url is not None:
            if self.service is not None or self.path is not None:
                raise ValueError("give either url, or service and path, not both")
            if not _registering(info):
                return self
            scheme, sep, rest = self.url.partition("://")
            authority = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else scheme
            if "${" in scheme or "${" in authority:
                raise ValueError(
                    "only the path and query of url may hold ${…} references: an "
                    "interpolated value is percent-encoded as one path segment or query value"
                )
            check_http_url(strip_refs(self.url), "url")
        else:
            if self.service is None or self.path is None:
                raise ValueError("a call needs service and path, or an absolute url")
            if not self.path.startswith("/"):
                raise ValueError("path must start with '/'")
        return self


class FallbackSpec(Document):
    response: Any = None


class CallbackSpec(Document):
    """The step is asynchronous: its participant may answer `202` and report the result
    later to the URL in `X-Saga-Callback-URL`, within `timeout_seconds` of the attempt's
    start (else the attempt is a timeout with an unknown outcome, retried by `retry`)."""

    timeout_seconds: float = Field(ge=1, le=MAX_CALLBACK_TIMEOUT, examples=[3600])


class StepSpec(Document):
    name: Name
    action: CallSpec
    compensation: CallSpec | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = Field(default_factory=_default_compensation_retry)
    critical: bool = True
    fallback: FallbackSpec | None = None
    pivot: bool = False
    callback: CallbackSpec | None = Field(
        default=None,
        description="Makes the step a callback step: the participant may answer `202` "
        "and report later with `POST /v1/callbacks/{token}`.",
    )


class DefinitionSpec(Document):
    """`POST /v1/definitions` body."""

    name: Name
    description: str = Field(default="", max_length=4096)
    timeout_seconds: float | None = Field(default=None, gt=0, le=31 * 86400)
    steps: list[StepSpec] = Field(min_length=1, max_length=200)
    exclusive: bool = Field(
        default=False,
        description="At most one non-terminal saga of this definition per business_key; "
        "a start needs a business_key.",
    )
    notify: NotifySpec | None = Field(
        default=None,
        description="The default completion notification of its sagas (a start's "
        "`notify` replaces it).",
    )

    def content_hash(self) -> str:
        """Hash of the normalised document (defaults filled in), for idempotent registration.
        A field added since v1 counts only when it is not at its default, so that a
        definition registered before it existed keeps its hash (and its version)."""
        document = self.model_dump(mode="json")
        for field, default in ADDED_FIELDS.items():
            if document.get(field) == default:
                document.pop(field, None)
        for step in document["steps"]:
            for field, default in ADDED_STEP_FIELDS.items():
                if step.get(field) == default:
                    step.pop(field, None)
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RuleViolation:
    """One broken cross-field rule, located like pydantic's errors."""

    loc: tuple[str | int, ...]
    msg: str


def check_definition(
    spec: DefinitionSpec, known_services: set[str], hosts: HostPolicy
) -> list[RuleViolation]:
    """Every rule that spans fields or needs the registry; empty when the definition is sound."""
    problems: list[RuleViolation] = []
    seen: dict[str, int] = {}
    for index, step in enumerate(spec.steps):
        if step.name in seen:
            problems.append(
                RuleViolation(
                    ("steps", index, "name"),
                    f"step name '{step.name}' is already used by step {seen[step.name]}",
                )
            )
        else:
            seen[step.name] = index
    pivots = [i for i, s in enumerate(spec.steps) if s.pivot]
    if len(pivots) > 1:
        problems.append(
            RuleViolation(
                ("steps",), f"at most one pivot step is allowed; steps {pivots} are pivots"
            )
        )
    for index, step in enumerate(spec.steps):
        earlier = {s.name for s in spec.steps[:index]}
        calls: list[tuple[str, CallSpec, set[str]]] = [("action", step.action, earlier)]
        if step.compensation is not None:
            calls.append(("compensation", step.compensation, earlier | {step.name}))
        for field, call, visible in calls:
            problems.extend(_check_call(call, ("steps", index, field), visible, known_services))
    for loc, url in call_urls(spec):
        decision = hosts.written(*url_host_port(strip_refs(url)))
        if decision.refused:
            problems.append(RuleViolation(loc, f"{url!r} is not allowed: {decision.reason}"))
    if spec.notify is not None:
        problems.extend(check_notify(spec.notify, ("notify",), known_services, hosts))
    return problems


def call_urls(spec: DefinitionSpec) -> list[tuple[tuple[str | int, ...], str]]:
    """Every absolute `url` of the definition's calls, with where it is written."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    for index, step in enumerate(spec.steps):
        for field, call in (("action", step.action), ("compensation", step.compensation)):
            if call is not None and call.url is not None:
                found.append((("steps", index, field, "url"), call.url))
    return found


def _check_call(
    call: CallSpec, loc: tuple[str | int, ...], visible: set[str], known_services: set[str]
) -> list[RuleViolation]:
    problems: list[RuleViolation] = []
    if call.service is not None and call.service not in known_services:
        problems.append(
            RuleViolation(
                (*loc, "service"),
                f"unknown service '{call.service}': register it first (PUT /v1/services/…)",
            )
        )
    parts = (("url", call.url), ("path", call.path), ("headers", call.headers), ("body", call.body))
    for part, value in parts:
        try:
            refs = list(iter_refs(value))
        except TemplateError as exc:
            problems.append(RuleViolation((*loc, part), str(exc)))
            continue
        for ref in refs:
            if ref.root == "steps" and ref.step not in visible:
                problems.append(
                    RuleViolation(
                        (*loc, part),
                        f"${{{ref}}} refers to step '{ref.step}', which is unknown or not earlier",
                    )
                )
    return problems


def is_name(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


# The notification target builds on this module's documents; DefinitionSpec refers to it.
from app.core.notify_spec import NotifySpec as NotifySpec  # noqa: E402
from app.core.notify_spec import check_notify as check_notify  # noqa: E402

DefinitionSpec.model_rebuild()
