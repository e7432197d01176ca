"""The checkout example: four participant services and the saga that ties them together.

Each participant is a small FastAPI app backed by its own PostgreSQL schema. It dedupes
on the `Idempotency-Key` header in the transaction that applies the effect, answers a
compensation for something that never happened with a no-op 2xx, and can be told to
fail, slow down or answer 503/429 through `POST /_chaos`. `saga-orchestrator demo`
starts all four next to the orchestrator and runs the classic failure scenarios.
"""

from examples.checkout.definition import CHECKOUT, service_specs
from examples.checkout.inventory import create_inventory_app
from examples.checkout.notifications import create_notifications_app
from examples.checkout.orders import create_orders_app
from examples.checkout.payments import create_payments_app

FACTORIES = {
    "payments": create_payments_app,
    "orders": create_orders_app,
    "inventory": create_inventory_app,
    "notifications": create_notifications_app,
}

__all__ = [
    "CHECKOUT",
    "FACTORIES",
    "create_inventory_app",
    "create_notifications_app",
    "create_orders_app",
    "create_payments_app",
    "service_specs",
]
