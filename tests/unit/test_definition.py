"""Definition and service documents: shape, defaults and cross-field rules (contract section 4)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.definition import (
    DEFAULT_RETRY_ON_STATUS,
    RESERVED_HEADERS,
    CallSpec,
    DefinitionSpec,
    RetryPolicy,
    RuleViolation,
    ServiceSpec,
    StepSpec,
    check_definition,
    check_http_url,
    check_json,
    is_name,
)
from app.core.hosts import HostPolicy

SERVICES = {"payments", "orders", "notifications"}


def step(name: str, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": name, "action": {"service": "payments", "path": f"/{name}"}}
    doc.update(extra)
    return doc


def definition(*steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "flow", "steps": list(steps) or [step("a")]}
    doc.update(extra)
    return doc


def parse(doc: dict[str, Any]) -> DefinitionSpec:
    return DefinitionSpec.model_validate(doc)


def violations(
    doc: dict[str, Any], services: set[str] = SERVICES, hosts: list[str] | None = None
) -> list[RuleViolation]:
    return check_definition(
        parse(doc), services, HostPolicy.parse(",".join(["*"] if hosts is None else hosts))
    )


def error_types(exc: ValidationError) -> list[str]:
    return [e["type"] for e in exc.errors()]


CHECKOUT: dict[str, Any] = {
    "name": "checkout",
    "description": "charge, create order, reserve stock, notify",
    "timeout_seconds": 300,
    "steps": [
        {
            "name": "charge_payment",
            "action": {
                "service": "payments",
                "method": "POST",
                "path": "/charges",
                "body": {"amount": "${input.amount}", "order_ref": "${saga.id}"},
            },
            "compensation": {
                "service": "payments",
                "method": "POST",
                "path": "/refunds",
                "body": {"charge_id": "${steps.charge_payment.response.id}"},
            },
            "timeout_seconds": 2,
            "retry": {
                "max_attempts": 4,
                "initial_interval_seconds": 0.2,
                "backoff_coefficient": 2.0,
                "max_interval_seconds": 10,
                "jitter": True,
            },
        },
        {
            "name": "create_order",
            "action": {
                "service": "orders",
                "path": "/orders",
                "body": {
                    "charge_id": "${steps.charge_payment.response.id}",
                    "items": "${input.items}",
                },
            },
            "compensation": {
                "service": "orders",
                "path": "/orders/cancel",
                "body": {"order_id": "${steps.create_order.response.id}"},
            },
        },
        {
            "name": "send_receipt",
            "critical": False,
            "action": {
                "service": "notifications",
                "path": "/emails",
                "body": {"to": "${input.email}"},
            },
        },
    ],
}


# --- the contract's example and defaults ---------------------------------------------


def test_contract_example_is_valid() -> None:
    spec = parse(CHECKOUT)
    assert check_definition(spec, SERVICES, ["*"]) == []
    assert [s.name for s in spec.steps] == ["charge_payment", "create_order", "send_receipt"]
    assert spec.timeout_seconds == 300
    assert spec.steps[0].retry.max_attempts == 4
    assert spec.steps[0].retry.initial_interval_seconds == 0.2
    assert spec.steps[0].timeout_seconds == 2
    assert spec.steps[2].critical is False
    assert spec.steps[2].compensation is None


def test_defaults_are_filled_in() -> None:
    spec = parse({"name": "flow", "steps": [{"name": "a", "action": {"url": "http://h/x"}}]})
    assert spec.description == ""
    assert spec.timeout_seconds is None
    s = spec.steps[0]
    assert s.action.method == "POST"
    assert s.action.headers == {}
    assert s.action.body is None
    assert s.compensation is None
    assert s.timeout_seconds is None
    assert s.critical is True
    assert s.pivot is False
    assert s.fallback is None
    assert s.retry == RetryPolicy(
        max_attempts=3,
        initial_interval_seconds=1.0,
        backoff_coefficient=2.0,
        max_interval_seconds=60.0,
        jitter=True,
        retry_on_status=[408, 425, 429, 500, 502, 503, 504],
    )
    assert s.compensation_retry == RetryPolicy(
        max_attempts=10,
        initial_interval_seconds=1.0,
        backoff_coefficient=2.0,
        max_interval_seconds=60.0,
        jitter=True,
        retry_on_status=[408, 425, 429, 500, 502, 503, 504],
    )
    assert tuple(DEFAULT_RETRY_ON_STATUS) == (408, 425, 429, 500, 502, 503, 504)


def test_service_defaults_and_base_url_normalised() -> None:
    svc = ServiceSpec.model_validate({"base_url": "http://127.0.0.1:9001/"})
    assert svc.base_url == "http://127.0.0.1:9001"
    assert svc.timeout_seconds == 10.0
    assert svc.max_concurrency == 20
    assert svc.headers == {}
    assert svc.circuit_breaker.failure_threshold == 5
    assert svc.circuit_breaker.recovery_timeout_seconds == 30.0
    assert svc.circuit_breaker.half_open_max_calls == 1


@pytest.mark.parametrize("method", ["post", "Post", "get", "put", "patch", "delete"])
def test_method_is_case_insensitive(method: str) -> None:
    call = CallSpec.model_validate({"url": "http://h/x", "method": method})
    assert call.method == method.upper()


@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "HEAD", "OPTIONS", "", "PO ST", 1])
def test_unsupported_method_rejected(method: Any) -> None:
    with pytest.raises(ValidationError):
        CallSpec.model_validate({"url": "http://h/x", "method": method})


# --- names -------------------------------------------------------------------------------

VALID_NAMES = ["a", "checkout", "charge_payment", "a1", "a-b", "a_b-c9", "a" * 64, "z" + "-" * 63]
INVALID_NAMES = [
    "",
    "A",
    "Checkout",
    "1abc",
    "_a",
    "-a",
    "a" * 65,
    "a.b",
    "a b",
    "a/b",
    "ä",
    "abc\n",
    "abc ",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    spec = parse(definition(step(name), name=name))
    assert spec.name == name
    assert spec.steps[0].name == name
    assert is_name(name) is True


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_definition_name(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(definition(name=name))
    assert error_types(info.value) == ["string_pattern_mismatch"]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_step_name(name: str) -> None:
    with pytest.raises(ValidationError):
        parse(definition(step(name)))


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_service_name_in_call(name: str) -> None:
    with pytest.raises(ValidationError):
        CallSpec.model_validate({"service": name, "path": "/x"})


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_is_name_agrees_with_the_pattern(name: str) -> None:
    assert is_name(name) is False


def test_steps_required_and_non_empty() -> None:
    with pytest.raises(ValidationError):
        parse({"name": "flow"})
    with pytest.raises(ValidationError):
        parse({"name": "flow", "steps": []})


def test_duplicate_step_names() -> None:
    doc = definition(step("a"), step("b"), step("a"), step("b"))
    assert violations(doc) == [
        RuleViolation(("steps", 2, "name"), "step name 'a' is already used by step 0"),
        RuleViolation(("steps", 3, "name"), "step name 'b' is already used by step 1"),
    ]


def test_unique_step_names_pass() -> None:
    assert violations(definition(step("a"), step("b"), step("c"))) == []


# --- template references -----------------------------------------------------------------


def with_body(name: str, body: Any, **extra: Any) -> dict[str, Any]:
    return step(name, action={"service": "payments", "path": "/x", "body": body}, **extra)


def test_reference_to_earlier_step_is_allowed() -> None:
    doc = definition(
        step("a"),
        with_body(
            "b",
            {
                "id": "${steps.a.response.id}",
                "code": "${steps.a.status_code}",
                "in": "${input.x.0}",
                "saga": "${saga.id}",
            },
        ),
    )
    assert violations(doc) == []


def test_reference_to_later_step_is_rejected() -> None:
    doc = definition(with_body("a", {"id": "${steps.b.response.id}"}), step("b"))
    assert violations(doc) == [
        RuleViolation(
            ("steps", 0, "action", "body"),
            "${steps.b.response.id} refers to step 'b', which is unknown or not earlier",
        )
    ]


def test_reference_to_unknown_step_is_rejected() -> None:
    doc = definition(step("a"), with_body("b", ["x ${steps.nope.status_code}"]))
    assert violations(doc) == [
        RuleViolation(
            ("steps", 1, "action", "body"),
            "${steps.nope.status_code} refers to step 'nope', which is unknown or not earlier",
        )
    ]


def test_action_may_not_reference_its_own_step() -> None:
    doc = definition(with_body("a", "${steps.a.response.id}"))
    assert [v.loc for v in violations(doc)] == [("steps", 0, "action", "body")]


def test_references_checked_in_path_and_headers() -> None:
    doc = definition(
        step(
            "a",
            action={
                "service": "payments",
                "path": "/x/${steps.later.response.id}",
                "headers": {"X-Ref": "${steps.ghost.response.id}"},
            },
        ),
        step("later"),
    )
    assert [v.loc for v in violations(doc)] == [
        ("steps", 0, "action", "path"),
        ("steps", 0, "action", "headers"),
    ]


def test_compensation_may_reference_its_own_step() -> None:
    doc = definition(
        step("a"),
        step(
            "b",
            compensation={
                "service": "payments",
                "path": "/undo/${steps.b.response.id}",
                "body": {"a": "${steps.a.response.id}", "b": "${steps.b.status_code}"},
            },
        ),
    )
    assert violations(doc) == []


def test_compensation_may_not_reference_a_later_step() -> None:
    doc = definition(
        step(
            "a",
            compensation={"service": "payments", "path": "/undo", "body": "${steps.b.response}"},
        ),
        step("b"),
    )
    assert violations(doc) == [
        RuleViolation(
            ("steps", 0, "compensation", "body"),
            "${steps.b.response} refers to step 'b', which is unknown or not earlier",
        )
    ]


@pytest.mark.parametrize(
    "body",
    [
        "${saga.x}",
        "${steps.a}",
        "${steps.a.status_code.x}",
        "${steps.a.body}",
        "${}",
        {"k": ["${env.HOME}"]},
    ],
)
def test_invalid_reference_is_a_violation(body: Any) -> None:
    doc = definition(step("a"), with_body("b", body))
    found = violations(doc)
    assert len(found) == 1
    assert found[0].loc == ("steps", 1, "action", "body")


@pytest.mark.parametrize(
    "url",
    [
        "http://h.example.com/x/${steps.b.response.id}",  # later step
        "http://h.example.com/x/${steps.nope.response.id}",  # unknown step
        "http://h.example.com/x?id=${saga.x}",  # not a reference
    ],
)
def test_references_in_url_are_checked(url: str) -> None:
    # Contract section 4: a reference to an unknown or later step is a 422 at registration.
    doc = definition(step("a", action={"url": url}), step("b"))
    found = violations(doc)
    assert len(found) == 1
    assert found[0].loc == ("steps", 0, "action", "url")


# --- services ---------------------------------------------------------------------------


def test_unknown_services() -> None:
    doc = definition(
        step(
            "a",
            action={"service": "ghost", "path": "/x"},
            compensation={"service": "phantom", "path": "/y"},
        ),
        step("b", action={"service": "orders", "path": "/x"}),
    )
    assert violations(doc) == [
        RuleViolation(
            ("steps", 0, "action", "service"),
            "unknown service 'ghost': register it first (PUT /v1/services/…)",
        ),
        RuleViolation(
            ("steps", 0, "compensation", "service"),
            "unknown service 'phantom': register it first (PUT /v1/services/…)",
        ),
    ]


def test_no_services_registered() -> None:
    assert [v.loc for v in violations(definition(step("a")), services=set())] == [
        ("steps", 0, "action", "service")
    ]


# --- call targets and URLs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        {"service": "payments", "path": "/x", "url": "http://h/x"},
        {"service": "payments", "url": "http://h/x"},
        {"path": "/x", "url": "http://h/x"},
        {"service": "payments"},
        {"path": "/x"},
        {},
        {"service": "payments", "path": "x"},
        {"service": "payments", "path": ""},
    ],
)
def test_call_target_rules(call: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CallSpec.model_validate(call)


@pytest.mark.parametrize(
    "url",
    [
        "http://h/x",
        "https://h/x",
        "HTTP://h/x",
        "http://127.0.0.1:9001/x?q=1",
        "https://api.example.com:8443/a/b",
        "http://[::1]:8080/x",
    ],
)
def test_http_urls_accepted(url: str) -> None:
    check_http_url(url, "url")
    assert CallSpec.model_validate({"url": url}).url == url
    assert ServiceSpec.model_validate({"base_url": url}).base_url == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/x",
        "file:///etc/passwd",
        "gopher://h/",
        "javascript:alert(1)",
        "ws://h/x",
        "h/x",
        "//h/x",
        "/x",
        "",
        "http://",
        "http:///x",
        "http://h:99999/x",
        "http://h:port/x",
        "http://[::1/x",
    ],
)
def test_non_http_or_malformed_urls_rejected(url: str) -> None:
    with pytest.raises(ValueError):
        check_http_url(url, "url")
    with pytest.raises(ValidationError):
        CallSpec.model_validate({"url": url})
    with pytest.raises(ValidationError):
        ServiceSpec.model_validate({"base_url": url})


@pytest.mark.parametrize(
    "url",
    ["http://user:pw@h/x", "http://user@h/x", "https://:pw@h/x", "http://u:p@127.0.0.1:9001/"],
)
def test_credentials_in_url_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="must not carry credentials"):
        check_http_url(url, "url")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        CallSpec.model_validate({"url": url})
    with pytest.raises(ValidationError, match="must not carry credentials"):
        ServiceSpec.model_validate({"base_url": url})


def test_scheme_error_message() -> None:
    with pytest.raises(ValueError) as info:
        check_http_url("ftp://h/x", "url")
    assert str(info.value) == "url must use http or https, not 'ftp'"


# --- allowed hosts (the rules themselves: tests/unit/test_hosts.py) ---------------------


def test_url_hosts_checked_against_allowed_hosts() -> None:
    doc = definition(
        step(
            "a",
            action={"url": "http://evil.com/x"},
            compensation={"url": "http://ok.internal:8080/undo"},
        ),
        step(
            "b", action={"url": "https://pay.internal/x"}, compensation={"url": "http://evil.com/y"}
        ),
    )
    assert violations(doc, hosts=["*.internal"]) == [
        RuleViolation(
            ("steps", 0, "action", "url"),
            "'http://evil.com/x' is not allowed: evil.com:80 matches no pattern of "
            "SAGA_ALLOWED_HOSTS",
        ),
        RuleViolation(
            ("steps", 1, "compensation", "url"),
            "'http://evil.com/y' is not allowed: evil.com:80 matches no pattern of "
            "SAGA_ALLOWED_HOSTS",
        ),
    ]
    assert violations(doc, hosts=["*"]) == []
    assert violations(doc, hosts=["*.internal", "evil.com"]) == []


def test_allowed_hosts_with_port() -> None:
    doc = definition(step("a", action={"url": "http://127.0.0.1:9001/x"}))
    assert violations(doc, hosts=["127.0.0.1:9001"]) == []
    assert [v.loc for v in violations(doc, hosts=["127.0.0.1:9002"])] == [
        ("steps", 0, "action", "url")
    ]


# --- pivots ------------------------------------------------------------------------------


def test_one_pivot_is_fine() -> None:
    assert violations(definition(step("a"), step("b", pivot=True), step("c"))) == []


@pytest.mark.parametrize(
    ("pivots", "listed"),
    [((1, 2), "[1, 2]"), ((0, 2, 3), "[0, 2, 3]"), ((0, 1, 2, 3), "[0, 1, 2, 3]")],
)
def test_more_than_one_pivot_rejected(pivots: tuple[int, ...], listed: str) -> None:
    doc = definition(*(step(name, pivot=i in pivots) for i, name in enumerate("abcd")))
    assert violations(doc) == [
        RuleViolation(("steps",), f"at most one pivot step is allowed; steps {listed} are pivots")
    ]


# --- retry policies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "retry",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 1001},
        {"initial_interval_seconds": 0},
        {"initial_interval_seconds": -1},
        {"backoff_coefficient": 0.5},
        {"max_interval_seconds": 0},
        {"initial_interval_seconds": 5, "max_interval_seconds": 4.99},
        {"initial_interval_seconds": 120},  # default max_interval 60 is below it
        {"retry_on_status": [200]},
        {"retry_on_status": [503, 204]},
        {"retry_on_status": [299]},
        {"retry_on_status": [99]},
        {"retry_on_status": [600]},
        {"retry_on_status": ["x"]},
        {"max_attempts": 3, "unknown": 1},
    ],
)
def test_invalid_retry_policy(retry: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RetryPolicy.model_validate(retry)
    with pytest.raises(ValidationError):
        parse(definition(step("a", retry=retry)))
    with pytest.raises(ValidationError):
        parse(definition(step("a", compensation_retry=retry)))


@pytest.mark.parametrize(
    "retry",
    [
        {"max_attempts": 1},
        {"max_attempts": 1000},
        {"initial_interval_seconds": 5, "max_interval_seconds": 5},
        {"backoff_coefficient": 1},
        {"retry_on_status": []},
        {"retry_on_status": [199, 300, 409, 599]},
        {"jitter": False},
    ],
)
def test_valid_retry_policy(retry: dict[str, Any]) -> None:
    policy = RetryPolicy.model_validate(retry)
    for key, value in retry.items():
        assert getattr(policy, key) == value


def test_retry_interval_order_message() -> None:
    with pytest.raises(ValidationError, match="max_interval_seconds must be >= initial"):
        RetryPolicy(initial_interval_seconds=2, max_interval_seconds=1)
    with pytest.raises(ValidationError, match="retry_on_status cannot contain a 2xx status"):
        RetryPolicy(retry_on_status=[201])


@pytest.mark.parametrize("timeout", [0, -1, 601])
def test_step_timeout_bounds(timeout: float) -> None:
    with pytest.raises(ValidationError):
        parse(definition(step("a", timeout_seconds=timeout)))


# --- headers -----------------------------------------------------------------------------


def _mixed_case(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


@pytest.mark.parametrize("name", sorted(RESERVED_HEADERS))
@pytest.mark.parametrize("spell", [str.lower, str.upper, _mixed_case])
def test_reserved_headers_rejected(name: str, spell: Any) -> None:
    header = spell(name)
    with pytest.raises(ValidationError, match="is set by the orchestrator"):
        CallSpec.model_validate({"url": "http://h/x", "headers": {header: "v"}})
    with pytest.raises(ValidationError, match="is set by the orchestrator"):
        ServiceSpec.model_validate({"base_url": "http://h", "headers": {header: "v"}})


def test_reserved_headers_cover_the_contract_headers() -> None:
    assert {
        "idempotency-key",
        "x-saga-id",
        "x-saga-step",
        "x-saga-attempt",
        "x-saga-deadline",
        "x-request-id",
        "content-type",
    } <= RESERVED_HEADERS


@pytest.mark.parametrize(
    "headers",
    [
        {"Bad Header": "v"},
        {"": "v"},
        {"X-Ok:": "v"},
        {"X-Ok": "a\r\nX-Injected: 1"},
        {"X-Ok": "a\nb"},
        {"X-Ok": "a\x7fb"},
        {"X-Ok": "a\x01b"},
        {"X-Ok": 5},
    ],
)
def test_invalid_headers_rejected(headers: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CallSpec.model_validate({"url": "http://h/x", "headers": headers})
    with pytest.raises(ValidationError):
        ServiceSpec.model_validate({"base_url": "http://h", "headers": headers})


def test_ordinary_headers_accepted() -> None:
    headers = {"X-Api-Key": "k", "Authorization": "Bearer t", "X-Tab": "a\tb", "Accept": "*/*"}
    assert CallSpec.model_validate({"url": "http://h/x", "headers": headers}).headers == headers
    assert ServiceSpec.model_validate({"base_url": "http://h", "headers": headers}).headers == (
        headers
    )


# --- JSON hygiene: NUL, depth, NaN -------------------------------------------------------


def nested_lists(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    "doc",
    [
        definition(with_body("a", {"note": "a\x00b"})),
        definition(with_body("a", {"k\x00": "v"})),
        definition(with_body("a", ["x", ["\x00"]])),
        definition(step("a"), description="nul \x00 here"),
        definition(step("a\x00")),
        definition(step("a", fallback={"response": {"x": "\x00"}})),
        definition(step("a", action={"url": "http://h/\x00"})),
    ],
)
def test_nul_characters_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse(doc)


def test_nul_rejection_message() -> None:
    with pytest.raises(ValueError) as info:
        check_json({"a": ["x\x00"]}, "body")
    assert str(info.value) == "body contains a NUL character (\\u0000), which is not allowed"


def test_nul_in_service_header_rejected() -> None:
    with pytest.raises(ValidationError):
        ServiceSpec.model_validate({"base_url": "http://h", "headers": {"X-A": "\x00"}})


def test_json_depth_boundary() -> None:
    check_json(nested_lists(64))
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        check_json(nested_lists(65))
    check_json(nested_dicts(64))
    with pytest.raises(ValueError, match="nests deeper than 64 levels"):
        check_json(nested_dicts(65))


def test_over_deep_body_rejected() -> None:
    with pytest.raises(ValidationError, match="nests deeper than 64 levels"):
        parse(definition(with_body("a", nested_dicts(100))))


def test_reasonably_nested_body_accepted() -> None:
    body = nested_dicts(20)
    assert parse(definition(with_body("a", body))).steps[0].action.body == body


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_json_numbers_rejected(value: float) -> None:
    # NaN and ±Infinity are not JSON and PostgreSQL's jsonb refuses them.
    with pytest.raises(ValueError):
        check_json({"x": [value]})
    with pytest.raises(ValidationError):
        parse(definition(with_body("a", {"x": value})))


@pytest.mark.parametrize(
    "value", [None, True, 0, -1.5, "text", "ü", [], {}, {"a": [1, {"b": None}]}]
)
def test_ordinary_json_accepted(value: Any) -> None:
    check_json(value)


# --- unknown fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(extra=1),
        lambda d: d["steps"][0].update(retries=3),
        lambda d: d["steps"][0]["action"].update(params={}),
        lambda d: d["steps"][0]["compensation"].update(timeout=1),
        lambda d: d["steps"][0]["retry"].update(max_retries=1),
        lambda d: d["steps"][0].update(compensation_retry={"attempts": 2}),
        lambda d: d["steps"][0].update(fallback={"response": 1, "status": 200}),
    ],
)
def test_unknown_fields_rejected(mutate: Any) -> None:
    doc = copy.deepcopy(CHECKOUT)
    mutate(doc)
    with pytest.raises(ValidationError) as info:
        parse(doc)
    assert "extra_forbidden" in error_types(info.value)


@pytest.mark.parametrize(
    "doc",
    [
        {"base_url": "http://h", "retries": 1},
        {"base_url": "http://h", "circuit_breaker": {"failure_threshold": 1, "open_for": 3}},
    ],
)
def test_unknown_service_fields_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSpec.model_validate(doc)
    assert error_types(info.value) == ["extra_forbidden"]


def test_step_spec_is_strict_too() -> None:
    with pytest.raises(ValidationError):
        StepSpec.model_validate({**step("a"), "weight": 1})


# --- content hash ------------------------------------------------------------------------


def test_content_hash_is_sha256_hex() -> None:
    digest = parse(CHECKOUT).content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_content_hash_equal_for_equal_content() -> None:
    assert parse(CHECKOUT).content_hash() == parse(copy.deepcopy(CHECKOUT)).content_hash()


def test_content_hash_ignores_key_order() -> None:
    reordered = {key: CHECKOUT[key] for key in reversed(list(CHECKOUT))}
    reordered["steps"] = [dict(reversed(list(s.items()))) for s in CHECKOUT["steps"]]
    assert parse(reordered).content_hash() == parse(CHECKOUT).content_hash()


def test_content_hash_equal_when_defaults_spelled_out() -> None:
    short = {"name": "flow", "steps": [{"name": "a", "action": {"service": "s", "path": "/x"}}]}
    defaults = {
        "max_attempts": 3,
        "initial_interval_seconds": 1,
        "backoff_coefficient": 2,
        "max_interval_seconds": 60,
        "jitter": True,
        "retry_on_status": [408, 425, 429, 500, 502, 503, 504],
    }
    full = {
        "name": "flow",
        "description": "",
        "timeout_seconds": None,
        "steps": [
            {
                "name": "a",
                "action": {
                    "service": "s",
                    "path": "/x",
                    "url": None,
                    "method": "post",
                    "headers": {},
                    "body": None,
                },
                "compensation": None,
                "timeout_seconds": None,
                "retry": defaults,
                "compensation_retry": {**defaults, "max_attempts": 10},
                "critical": True,
                "fallback": None,
                "pivot": False,
            }
        ],
    }
    assert parse(full).content_hash() == parse(short).content_hash()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(description="other"),
        lambda d: d.update(timeout_seconds=301),
        lambda d: d.update(name="checkout2"),
        lambda d: d["steps"][0]["action"]["body"].update(amount="${input.total}"),
        lambda d: d["steps"][0]["action"].update(path="/charges/v2"),
        lambda d: d["steps"][0]["action"].update(method="PUT"),
        lambda d: d["steps"][0]["retry"].update(max_attempts=5),
        lambda d: d["steps"][0].update(compensation_retry={"max_attempts": 9}),
        lambda d: d["steps"][1].update(name="make_order"),
        lambda d: d["steps"][2].update(critical=True),
        lambda d: d["steps"][1].update(pivot=True),
        lambda d: d["steps"][2].update(fallback={"response": None}),
        lambda d: d["steps"][1].pop("compensation"),
        lambda d: d["steps"].reverse(),
        lambda d: d["steps"][0]["action"]["body"].update(amount=1),
        lambda d: d["steps"][0]["action"]["body"].update(amount=True),
    ],
)
def test_content_hash_changes_with_content(mutate: Any) -> None:
    changed = copy.deepcopy(CHECKOUT)
    mutate(changed)
    assert parse(changed).content_hash() != parse(CHECKOUT).content_hash()
