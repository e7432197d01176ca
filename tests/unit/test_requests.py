"""Building the HTTP request a participant receives (contract section 6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from app.core.definition import CallSpec, ServiceSpec
from app.core.requests import HttpRequest, build_request, idempotency_key
from app.core.states import Direction
from app.core.templates import RenderContext, TemplateError

SAGA_ID = uuid.UUID("0b9f6a4e-2f5c-4d8e-9a31-7c2d1e0f4b56")
DEADLINE = datetime(2025, 3, 1, 12, 30, 0, tzinfo=UTC)

CTX = RenderContext(
    input={
        "amount": 42,
        "order_id": "o-17",
        "token": "t0k",
        "flag": True,
        "obj": {"a": 1},
        "evil": "x\r\nX-Injected: 1",
        "host": "pay.internal:99999",
        "other_host": "evil.example.com",
    },
    saga_id=str(SAGA_ID),
    step_results={"charge": (201, {"id": "ch_1"})},
)

PAY = ServiceSpec.model_validate(
    {"base_url": "http://127.0.0.1:9001/", "timeout_seconds": 5, "headers": {"X-Api-Key": "k3y"}}
)


def call(**fields: Any) -> CallSpec:
    doc: dict[str, Any] = {"service": "pay", "path": "/charges"}
    doc.update(fields)
    if "url" in fields:
        doc.pop("service")
        doc.pop("path")
    return CallSpec.model_validate(doc)


def build(
    spec: CallSpec,
    service: ServiceSpec | None = PAY,
    *,
    step_name: str = "charge_payment",
    step_timeout: float | None = None,
    direction: Direction = Direction.ACTION,
    request_id: str | None = "req-1",
    deadline_at: datetime | None = None,
    context: RenderContext = CTX,
) -> HttpRequest:
    return build_request(
        call=spec,
        service=service,
        step_name=step_name,
        step_timeout=step_timeout,
        direction=direction,
        saga_id=SAGA_ID,
        context=context,
        request_id=request_id,
        deadline_at=deadline_at,
    )


def lower_keys(headers: dict[str, str]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for key, value in headers.items():
        seen.setdefault(key.lower(), []).append(value)
    return seen


def test_full_request_for_a_service_call() -> None:
    spec = call(
        path="/charges/${input.order_id}",
        body={"amount": "${input.amount}", "order_ref": "${saga.id}", "note": "n=${input.amount}"},
    )
    assert build(spec) == HttpRequest(
        method="POST",
        url="http://127.0.0.1:9001/charges/o-17",
        headers={
            "X-Api-Key": "k3y",
            "Content-Type": "application/json",
            "Idempotency-Key": f"{SAGA_ID}:charge_payment:action",
            "X-Saga-Id": str(SAGA_ID),
            "X-Saga-Step": "charge_payment",
            "X-Request-ID": "req-1",
        },
        body={"amount": 42, "order_ref": str(SAGA_ID), "note": "n=42"},
        timeout_seconds=5.0,
    )


def test_compensation_request() -> None:
    spec = call(path="/refunds", body={"charge_id": "${steps.charge.response.id}"})
    request = build(spec, step_name="charge", direction=Direction.COMPENSATION)
    assert request.headers["Idempotency-Key"] == f"{SAGA_ID}:charge:compensation"
    assert request.headers["X-Saga-Step"] == "charge"
    assert request.body == {"charge_id": "ch_1"}
    assert request.url == "http://127.0.0.1:9001/refunds"


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        (Direction.ACTION, "0b9f6a4e-2f5c-4d8e-9a31-7c2d1e0f4b56:create_order:action"),
        (Direction.COMPENSATION, "0b9f6a4e-2f5c-4d8e-9a31-7c2d1e0f4b56:create_order:compensation"),
    ],
)
def test_idempotency_key_format(direction: Direction, expected: str) -> None:
    assert idempotency_key(SAGA_ID, "create_order", direction) == expected


def test_idempotency_key_is_the_same_on_every_attempt() -> None:
    first = build(call())
    second = build(call(), request_id="req-2", deadline_at=DEADLINE)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]


def test_idempotency_key_differs_between_sagas_steps_and_directions() -> None:
    other = uuid.UUID("11111111-1111-4111-8111-111111111111")
    keys = {
        idempotency_key(SAGA_ID, "a", Direction.ACTION),
        idempotency_key(SAGA_ID, "a", Direction.COMPENSATION),
        idempotency_key(SAGA_ID, "b", Direction.ACTION),
        idempotency_key(other, "a", Direction.ACTION),
    }
    assert len(keys) == 4


def test_request_id_falls_back_to_the_saga_id() -> None:
    assert build(call(), request_id=None).headers["X-Request-ID"] == str(SAGA_ID)


def test_deadline_header_is_rfc3339() -> None:
    request = build(call(), deadline_at=DEADLINE)
    value = request.headers["X-Saga-Deadline"]
    assert value == "2025-03-01T12:30:00+00:00"
    assert datetime.fromisoformat(value) == DEADLINE


def test_deadline_header_keeps_fractions_and_offsets() -> None:
    deadline = datetime(2025, 3, 1, 12, 30, 0, 250000, tzinfo=UTC)
    assert build(call(), deadline_at=deadline).headers["X-Saga-Deadline"] == (
        "2025-03-01T12:30:00.250000+00:00"
    )


def test_no_deadline_header_without_a_deadline() -> None:
    assert "X-Saga-Deadline" not in build(call(), deadline_at=None).headers


def test_service_and_call_headers_are_merged() -> None:
    spec = call(headers={"Authorization": "Bearer ${input.token}", "X-Amount": "${input.amount}"})
    headers = build(spec).headers
    assert headers["X-Api-Key"] == "k3y"
    assert headers["Authorization"] == "Bearer t0k"
    assert headers["X-Amount"] == "42"


def test_call_header_overrides_service_header() -> None:
    headers = build(call(headers={"X-Api-Key": "step-key"})).headers
    assert headers["X-Api-Key"] == "step-key"


def test_call_header_overrides_service_header_case_insensitively() -> None:
    # HTTP header names are case-insensitive: one X-Api-Key must reach the participant.
    headers = build(call(headers={"x-api-key": "step-key"})).headers
    assert lower_keys(headers)["x-api-key"] == ["step-key"]


def test_every_contract_header_present_exactly_once() -> None:
    headers = build(call(headers={"X-Other": "1"}), deadline_at=DEADLINE).headers
    seen = lower_keys(headers)
    for name in (
        "idempotency-key",
        "x-saga-id",
        "x-saga-step",
        "x-request-id",
        "content-type",
        "x-saga-deadline",
    ):
        assert len(seen[name]) == 1, name
    assert seen["content-type"] == ["application/json"]


def test_building_does_not_change_the_service() -> None:
    build(call(headers={"X-Extra": "1"}))
    assert PAY.headers == {"X-Api-Key": "k3y"}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${input.order_id}", "o-17"),
        ("${input.amount}", "42"),
        ("id-${input.amount}", "id-42"),
        ("${input.flag}", "true"),  # JSON text, as in interpolation
        ("flag=${input.flag}", "flag=true"),
        ("${input.obj}", '{"a":1}'),
        ("${steps.charge.status_code}", "201"),
    ],
)
def test_rendered_header_values_are_text(template: str, expected: str) -> None:
    assert build(call(headers={"X-Value": template})).headers["X-Value"] == expected


def test_header_value_with_control_characters_is_refused() -> None:
    with pytest.raises(TemplateError, match="control characters"):
        build(call(headers={"X-Note": "${input.evil}"}))


def test_absolute_url_call() -> None:
    spec = call(url="https://api.example.com/orders/${input.order_id}?ref=${saga.id}", method="put")
    request = build(spec, service=None)
    assert request.url == f"https://api.example.com/orders/o-17?ref={SAGA_ID}"
    assert request.method == "PUT"
    assert request.timeout_seconds == 10.0
    assert request.headers == {
        "Content-Type": "application/json",
        "Idempotency-Key": f"{SAGA_ID}:charge_payment:action",
        "X-Saga-Id": str(SAGA_ID),
        "X-Saga-Step": "charge_payment",
        "X-Request-ID": "req-1",
    }


def test_no_body_stays_none() -> None:
    request = build(call(method="GET"))
    assert request.method == "GET"
    assert request.body is None


def test_body_non_string_leaves_untouched() -> None:
    body = {"n": 1, "f": 2.5, "b": False, "z": None, "l": [1, "${input.amount}"]}
    assert build(call(body=body)).body == {"n": 1, "f": 2.5, "b": False, "z": None, "l": [1, 42]}


@pytest.mark.parametrize(
    ("step_timeout", "service", "spec", "expected"),
    [
        (2.5, PAY, call(), 2.5),  # step wins over service
        (None, PAY, call(), 5.0),  # service's
        (None, ServiceSpec(base_url="http://127.0.0.1:9001"), call(), 10.0),  # service default
        (None, None, call(url="http://h.example.com/x"), 10.0),  # no service: 10
        (3.0, None, call(url="http://h.example.com/x"), 3.0),
        (30.0, PAY, call(), 30.0),  # longer than the service's is fine too
    ],
)
def test_timeout_precedence(
    step_timeout: float | None, service: ServiceSpec | None, spec: CallSpec, expected: float
) -> None:
    assert build(spec, service, step_timeout=step_timeout).timeout_seconds == expected


def test_unregistered_service_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="service 'pay' is not registered"):
        build(call(), service=None)


@pytest.mark.parametrize(
    "url", ["http://${input.host}/x", "${input.url}", "http://h:${input.port}/x", "${input.s}://h/"]
)
def test_a_template_in_the_scheme_or_host_is_refused_at_registration(url: str) -> None:
    with pytest.raises(ValidationError, match="only the path and query of url"):
        call(url=url)


@pytest.mark.parametrize(
    ("template", "value", "sent"),
    [
        (
            "/orders/${input.id}/status",
            "../../admin/wipe?all=1#",
            "/orders/%2E%2E%2F%2E%2E%2Fadmin%2Fwipe%3Fall%3D1%23/status",
        ),
        ("/orders/${input.id}", "..", "/orders/%2E%2E"),
        ("/orders/.${input.id}", ".", "/orders/.%2E"),
        ("/files/${input.id}", "a b\tc\nd", "/files/a%20b%09c%0Ad"),
        ("/q?name=${input.id}&x=1", "a&x=2#f", "/q?name=a%26x%3D2%23f&x=1"),
        ("/n/${input.id}", "Zoë", "/n/Zo%C3%AB"),
    ],
)
def test_interpolated_values_stay_inside_their_segment(
    template: str, value: str, sent: str
) -> None:
    context = RenderContext(input={"id": value}, saga_id=str(SAGA_ID), step_results={})
    request = build(call(path=template), context=context)
    assert request.url == "http://127.0.0.1:9001" + sent


@pytest.mark.parametrize(
    "spec",
    [
        call(path="/x/${input.missing}"),
        call(body={"id": "${steps.ghost.response.id}"}),
        call(headers={"X-Ref": "${steps.charge.response.missing}"}),
        call(url="http://h.example.com/${input.missing}"),
    ],
)
def test_missing_template_path_is_a_template_error(spec: CallSpec) -> None:
    with pytest.raises(TemplateError):
        build(spec)
