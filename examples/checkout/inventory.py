"""The inventory participant.

POST /reservations          {order_ref, items} -> 201 {id, order_ref, items, status}
POST /reservations/release  {order_ref} -> 200: releases that order's stock; none is fine
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from examples.checkout.kit import Connection, Item, OrderRef, Participant, closed_conflict, new_id

TABLES = (
    """CREATE TABLE IF NOT EXISTS inventory.reservations (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        items jsonb NOT NULL,
        status text NOT NULL DEFAULT 'held',
        created_at timestamptz NOT NULL DEFAULT now(),
        released_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS reservations_order_ref ON inventory.reservations (order_ref)",
)

_FOR_REF = "WHERE (%(ref)s::text IS NULL OR order_ref = %(ref)s)"
COUNTS = {
    "reservations": f"SELECT count(*) FROM inventory.reservations {_FOR_REF}",
    "reservations_released": (
        f"SELECT count(*) FROM inventory.reservations {_FOR_REF} AND status = 'released'"
    ),
}


class ReservationIn(BaseModel):
    order_ref: str = Field(min_length=1, max_length=255)
    items: list[Item] = Field(min_length=1, max_length=100)


def create_inventory_app(dsn: str) -> FastAPI:
    """The inventory service, storing its effects in the `inventory` schema of `dsn`."""
    svc = Participant("inventory", dsn, TABLES, COUNTS)
    app = svc.create_app("inventory", __doc__ or "")

    @app.post("/reservations", status_code=201, summary="Reserve stock for an order")
    async def reserve(body: ReservationIn, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            if await svc.is_closed(conn, body.order_ref):
                return closed_conflict("reserving stock for", body.order_ref)
            reservation_id = new_id("res")
            items = [item.model_dump() for item in body.items]
            await conn.execute(
                "INSERT INTO inventory.reservations (id, order_ref, items) VALUES (%s, %s, %s)",
                (reservation_id, body.order_ref, Jsonb(items)),
            )
            return 201, {
                "id": reservation_id,
                "order_ref": body.order_ref,
                "items": items,
                "status": "held",
            }

        return await svc.once(request, body, body.order_ref, effect)

    @app.post("/reservations/release", summary="Release an order's stock (a no-op when none)")
    async def release(body: OrderRef, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            cursor = await conn.execute(
                "UPDATE inventory.reservations SET status = 'released', released_at = now() "
                "WHERE order_ref = %s AND status = 'held' RETURNING id",
                (body.order_ref,),
            )
            released = [row[0] for row in await cursor.fetchall()]
            await svc.close_order(conn, body.order_ref)
            return 200, {"order_ref": body.order_ref, "released": released}

        return await svc.once(request, body, body.order_ref, effect)

    app.state.participant = svc
    return app
