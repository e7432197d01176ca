"""The checkout saga and the services it calls, as the JSON documents the API takes.

    charge_payment  -> fraud_score   -> create_order  -> reserve_stock   -> send_receipt
    (refund)           (fallback)       (cancel)         (release)          (not critical)

Every compensation is keyed on `${saga.id}` (the order reference the action was sent
with), so it works even when the action's answer was never seen. Timeouts and retry
intervals are short, to suit a demo that runs in under a minute.

`charge_payment` is a callback step: the payment provider confirms asynchronously, so
payments answers `202` and reports the outcome (captured, or declined: the saga
compensates) to the call's `X-Saga-Callback-URL` a moment later. Without a report within
`CONFIRM_WITHIN` seconds, the attempt is a timeout and is retried with the same
Idempotency-Key and a new callback URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ORDER_REF = "${saga.id}"
CONFIRM_WITHIN = 10  # seconds the charge waits for the provider's report, per attempt


def _retry(attempts: int, initial: float = 0.2, maximum: float = 2.0) -> dict[str, Any]:
    return {
        "max_attempts": attempts,
        "initial_interval_seconds": initial,
        "backoff_coefficient": 2.0,
        "max_interval_seconds": maximum,
        "jitter": True,
    }


CHECKOUT: dict[str, Any] = {
    "name": "checkout",
    "description": "Charge the card, score fraud, create the order, reserve stock, email a "
    "receipt. A failure refunds, cancels and releases what was done, in reverse order.",
    "timeout_seconds": 120,
    "steps": [
        {
            "name": "charge_payment",
            "action": {
                "service": "payments",
                "path": "/charges",
                "body": {"amount": "${input.amount}", "order_ref": ORDER_REF},
            },
            "compensation": {
                "service": "payments",
                "path": "/refunds",
                "body": {"order_ref": ORDER_REF},
            },
            "timeout_seconds": 3,  # the call itself; the confirmation may take longer:
            "callback": {"timeout_seconds": CONFIRM_WITHIN},
            "retry": _retry(5),
            "compensation_retry": _retry(10),
        },
        {
            "name": "fraud_score",
            "action": {
                "service": "payments",
                "path": "/fraud-score",
                "body": {"order_ref": ORDER_REF, "amount": "${input.amount}"},
            },
            "timeout_seconds": 1,
            "retry": _retry(2, maximum=0.5),
            # Scoring is advisory: when it is down, go on with a neutral score.
            "fallback": {"response": {"score": 0, "source": "fallback"}},
        },
        {
            "name": "create_order",
            "action": {
                "service": "orders",
                "path": "/orders",
                "body": {
                    "order_ref": ORDER_REF,
                    "charge_id": "${steps.charge_payment.response.id}",
                    "items": "${input.items}",
                    "fraud_score": "${steps.fraud_score.response.score}",
                },
            },
            "compensation": {
                "service": "orders",
                "path": "/orders/cancel",
                "body": {"order_ref": ORDER_REF},
            },
            "timeout_seconds": 3,
            "retry": _retry(5),
            "compensation_retry": _retry(10),
        },
        {
            "name": "reserve_stock",
            "action": {
                "service": "inventory",
                "path": "/reservations",
                "body": {"order_ref": ORDER_REF, "items": "${input.items}"},
            },
            "compensation": {
                "service": "inventory",
                "path": "/reservations/release",
                "body": {"order_ref": ORDER_REF},
            },
            "timeout_seconds": 3,
            # Attempts are spent only on calls actually made: while inventory's circuit is
            # open the step waits for the half-open probe instead.
            "retry": _retry(8),
            "compensation_retry": _retry(10),
        },
        {
            "name": "send_receipt",
            "critical": False,  # a failed email is dead-lettered; the order stands
            "action": {
                "service": "notifications",
                "path": "/emails",
                "body": {
                    "to": "${input.email}",
                    "order_ref": ORDER_REF,
                    "order_id": "${steps.create_order.response.id}",
                },
            },
            "timeout_seconds": 2,
            "retry": _retry(3, maximum=1.0),
        },
    ],
}


def service_specs(
    urls: Mapping[str, str], *, recovery_timeout_seconds: float = 3.0
) -> dict[str, dict[str, Any]]:
    """`PUT /v1/services/{name}` bodies for the four participants at `urls`.

    Inventory gets a sensitive circuit breaker (3 failures open it) so the demo can show
    it opening and closing again within seconds.
    """
    return {
        "payments": {"base_url": urls["payments"], "timeout_seconds": 3, "max_concurrency": 20},
        "orders": {"base_url": urls["orders"], "timeout_seconds": 3, "max_concurrency": 20},
        "inventory": {
            "base_url": urls["inventory"],
            "timeout_seconds": 3,
            "max_concurrency": 20,
            "circuit_breaker": {
                "failure_threshold": 3,
                "recovery_timeout_seconds": recovery_timeout_seconds,
                "half_open_max_calls": 1,
            },
        },
        "notifications": {
            "base_url": urls["notifications"],
            "timeout_seconds": 2,
            "max_concurrency": 20,
        },
    }
