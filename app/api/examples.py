"""Example documents for the OpenAPI document: one checkout saga, seen from every endpoint."""

from __future__ import annotations

from typing import Any

from app.api.schemas import FindingOut, PlanOut
from app.core.checklist import review
from app.core.definition import DefinitionSpec, ServiceSpec

SAGA_ID = "0b7e4a52-3c1d-4f7a-9a52-8e2b1c4d5f60"
DEAD_LETTER_ID = "5d0c8f3e-2b7a-4c19-8e6d-1f2a3b4c5d6e"
AT = "2026-01-15T10:00:00.120000+00:00"
LATER = "2026-01-15T10:00:00.480000+00:00"

SERVICE_SPEC: dict[str, Any] = {
    "base_url": "http://127.0.0.1:9001",
    "timeout_seconds": 5,
    "max_concurrency": 20,
    "circuit_breaker": {
        "failure_threshold": 5,
        "recovery_timeout_seconds": 30,
        "half_open_max_calls": 1,
    },
    "headers": {"X-Api-Key": "secret"},
}

SERVICE_OUT: dict[str, Any] = {
    "name": "payments",
    "base_url": "http://127.0.0.1:9001",
    "timeout_seconds": 5.0,
    "max_concurrency": 20,
    "circuit_breaker": SERVICE_SPEC["circuit_breaker"],
    "headers": {"X-Api-Key": "[redacted]"},
    "circuit_state": "closed",
    "consecutive_failures": 0,
    "opened_at": None,
    "in_flight": 0,
    "created_at": AT,
    "updated_at": AT,
}

DEFINITION_SPEC: dict[str, Any] = {
    "name": "checkout",
    "description": "charge, then create the order",
    "timeout_seconds": 300,
    "steps": [
        {
            "name": "charge_payment",
            "action": {
                "service": "payments",
                "path": "/charges",
                "body": {"amount": "${input.amount}", "order_ref": "${saga.id}"},
            },
            "compensation": {
                "service": "payments",
                "path": "/refunds",
                "body": {"order_ref": "${saga.id}"},
            },
            "retry": {"max_attempts": 4, "initial_interval_seconds": 0.2},
        },
        {
            "name": "create_order",
            "action": {
                "service": "payments",
                "path": "/orders",
                "body": {"charge_id": "${steps.charge_payment.response.id}"},
            },
        },
    ],
}

_SPEC = DefinitionSpec.model_validate(DEFINITION_SPEC)
DEFINITION_OUT: dict[str, Any] = {
    "name": "checkout",
    "version": 1,
    "content_hash": _SPEC.content_hash(),
    "description": _SPEC.description,
    "timeout_seconds": _SPEC.timeout_seconds,
    "steps": [step.model_dump(mode="json") for step in _SPEC.steps],
    "exclusive": False,
    "created_at": AT,
}

# The plan of the example definition, as the plan code works it out.
_REVIEW = review(_SPEC, {"payments": ServiceSpec.model_validate(SERVICE_SPEC)})
PLAN_OUT: dict[str, Any] = PlanOut.of("checkout", 1, _REVIEW).model_dump(mode="json")
REGISTERED_OUT: dict[str, Any] = {
    **DEFINITION_OUT,
    "warnings": [FindingOut.of(f).model_dump(mode="json") for f in _REVIEW.warnings],
}

SAGA_START: dict[str, Any] = {
    "definition": "checkout",
    "input": {"amount": 42},
    "business_key": "order-1001",
    "labels": {"channel": "web"},
}


def _step(name: str, status: str, response: Any, code: int | None) -> dict[str, Any]:
    done = status != "pending"
    return {
        "name": name,
        "status": status,
        "attempts": 1 if done else 0,
        "compensation_attempts": 0,
        "status_code": code,
        "response": response,
        "last_error": None,
        "started_at": AT if done else None,
        "finished_at": LATER if done else None,
    }


SAGA_OUT: dict[str, Any] = {
    "id": SAGA_ID,
    "definition": "checkout",
    "definition_version": 1,
    "status": "running",
    "input": {"amount": 42},
    "idempotency_key": "order-1001",
    "business_key": "order-1001",
    "labels": {"channel": "web"},
    "created_at": AT,
    "updated_at": LATER,
    "finished_at": None,
    "deadline_at": "2026-01-15T10:05:00.120000+00:00",
    "cancel_requested": False,
    "error": None,
    "notification": {"status": "pending", "attempts": 0},
    "steps": [
        _step("charge_payment", "succeeded", {"id": "ch_1"}, 201),
        _step("create_order", "pending", None, None),
    ],
}

SAGA_SUMMARY: dict[str, Any] = {
    **{k: v for k, v in SAGA_OUT.items() if k not in ("input", "notification")},
    "steps": [{k: v for k, v in step.items() if k != "response"} for step in SAGA_OUT["steps"]],
}

EVENT: dict[str, Any] = {
    "id": 2,
    "at": AT,
    "type": "attempt_finished",
    "step": "charge_payment",
    "direction": "action",
    "attempt": 1,
    "outcome": "succeeded",
    "status_code": 201,
    "error_kind": None,
    "message": None,
    "duration_ms": 38.5,
    "worker": "host:4242:a1b2c3",
}

DEAD_LETTER: dict[str, Any] = {
    "id": DEAD_LETTER_ID,
    "saga_id": SAGA_ID,
    "definition": "checkout",
    "step": "charge_payment",
    "direction": "compensation",
    "service": "payments",
    "attempts": 10,
    "last_error": {
        "kind": "http_status",
        "message": "503 Service Unavailable",
        "status_code": 503,
        "attempt": 10,
        "direction": "compensation",
    },
    "request": {
        "method": "POST",
        "url": "http://127.0.0.1:9001/refunds",
        "headers": {
            "X-Api-Key": "[redacted]",
            "Idempotency-Key": f"{SAGA_ID}:charge_payment:compensation",
        },
        "body": {"order_ref": SAGA_ID},
    },
    "status": "open",
    "reason": None,
    "created_at": AT,
    "resolved_at": None,
    "resolved_by": None,
}

AUDIT: dict[str, Any] = {
    "id": 7,
    "at": AT,
    "actor": "tok_1a2b3c4d5e",
    "action": "dead_letter.retry",
    "target": DEAD_LETTER_ID,
    "details": {},
}

DASHBOARD: dict[str, Any] = {
    "sagas_by_status": {
        "running": 1,
        "compensating": 0,
        "completed": 40,
        "compensated": 2,
        "failed": 0,
    },
    "sagas_by_definition": {"checkout": {"running": 1, "completed": 40, "compensated": 2}},
    "in_flight": 1,
    "last_hour": {
        "finished": 42,
        "failed": 2,
        "failure_rate": 0.048,
        "buckets": [{"at": "2026-01-15T09:55:00+00:00", "finished": 42, "failed": 2}],
    },
    "dead_letters_open": 0,
    "executor_lag_seconds": 0.02,
    "services": [
        {
            "name": "payments",
            "circuit_state": "closed",
            "in_flight": 1,
            "consecutive_failures": 0,
            "max_concurrency": 20,
        }
    ],
    "recent_failures": [
        {
            "id": SAGA_ID,
            "definition": "checkout",
            "status": "compensated",
            "error": {"step": "create_order", "kind": "http_status", "message": "400 Bad Request"},
            "finished_at": LATER,
        }
    ],
}


def page(item: dict[str, Any], cursor: str | None = None) -> dict[str, Any]:
    return {"items": [item], "next_cursor": cursor}
