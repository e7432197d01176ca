"""The orders participant.

POST /orders         {order_ref, charge_id, items, fraud_score} -> 201 {id, order_ref, status}
POST /orders/cancel  {order_ref} -> 200: cancels that order; none is fine
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from examples.checkout.kit import Connection, Item, OrderRef, Participant, closed_conflict, new_id

TABLES = (
    """CREATE TABLE IF NOT EXISTS orders.orders (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        charge_id text,
        items jsonb NOT NULL,
        fraud_score integer,
        status text NOT NULL DEFAULT 'created',
        created_at timestamptz NOT NULL DEFAULT now(),
        cancelled_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS orders_order_ref ON orders.orders (order_ref)",
)

_FOR_REF = "WHERE (%(ref)s::text IS NULL OR order_ref = %(ref)s)"
COUNTS = {
    "orders": f"SELECT count(*) FROM orders.orders {_FOR_REF}",
    "orders_cancelled": f"SELECT count(*) FROM orders.orders {_FOR_REF} AND status = 'cancelled'",
}


class OrderIn(BaseModel):
    order_ref: str = Field(min_length=1, max_length=255)
    charge_id: str | None = Field(default=None, max_length=255)
    items: list[Item] = Field(min_length=1, max_length=100)
    fraud_score: int | None = Field(default=None, ge=0, le=100)


def create_orders_app(dsn: str) -> FastAPI:
    """The orders service, storing its effects in the `orders` schema of `dsn`."""
    svc = Participant("orders", dsn, TABLES, COUNTS)
    app = svc.create_app("orders", __doc__ or "")

    @app.post("/orders", status_code=201, summary="Create an order")
    async def create(body: OrderIn, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            if await svc.is_closed(conn, body.order_ref):
                return closed_conflict("creating", body.order_ref)
            order_id = new_id("ord")
            items = [item.model_dump() for item in body.items]
            await conn.execute(
                "INSERT INTO orders.orders (id, order_ref, charge_id, items, fraud_score) "
                "VALUES (%s, %s, %s, %s, %s)",
                (order_id, body.order_ref, body.charge_id, Jsonb(items), body.fraud_score),
            )
            return 201, {"id": order_id, "order_ref": body.order_ref, "status": "created"}

        return await svc.once(request, body, body.order_ref, effect)

    @app.post("/orders/cancel", summary="Cancel an order (a no-op when there is none)")
    async def cancel(body: OrderRef, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            cursor = await conn.execute(
                "UPDATE orders.orders SET status = 'cancelled', cancelled_at = now() "
                "WHERE order_ref = %s AND status = 'created' RETURNING id",
                (body.order_ref,),
            )
            cancelled = [row[0] for row in await cursor.fetchall()]
            await svc.close_order(conn, body.order_ref)
            return 200, {"order_ref": body.order_ref, "cancelled": cancelled}

        return await svc.once(request, body, body.order_ref, effect)

    app.state.participant = svc
    return app
