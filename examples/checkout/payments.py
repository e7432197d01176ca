"""The payments participant: charges, refunds and a fraud score.

POST /charges      {amount, order_ref}  -> 201 {id, order_ref, amount, status}
POST /refunds      {order_ref}          -> 200: refunds that order's charges; none is fine
POST /fraud-score  {order_ref, amount}  -> 200 {score, source}
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from examples.checkout.kit import Connection, OrderRef, Participant, closed_conflict, new_id

TABLES = (
    """CREATE TABLE IF NOT EXISTS payments.charges (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        amount numeric(12, 2) NOT NULL,
        status text NOT NULL DEFAULT 'captured',
        created_at timestamptz NOT NULL DEFAULT now(),
        refunded_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS charges_order_ref ON payments.charges (order_ref)",
    """CREATE TABLE IF NOT EXISTS payments.refunds (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        charge_id text NOT NULL REFERENCES payments.charges (id),
        amount numeric(12, 2) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS payments.fraud_checks (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        amount numeric(12, 2) NOT NULL,
        score integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
)

_FOR_REF = "WHERE (%(ref)s::text IS NULL OR order_ref = %(ref)s)"
COUNTS = {
    "charges": f"SELECT count(*) FROM payments.charges {_FOR_REF}",
    "charges_refunded": f"SELECT count(*) FROM payments.charges {_FOR_REF} AND status = 'refunded'",
    "refunds": f"SELECT count(*) FROM payments.refunds {_FOR_REF}",
    "fraud_checks": f"SELECT count(*) FROM payments.fraud_checks {_FOR_REF}",
}


class ChargeIn(BaseModel):
    amount: Decimal = Field(gt=0, le=1_000_000, decimal_places=2)
    order_ref: str = Field(min_length=1, max_length=255)


class FraudIn(BaseModel):
    order_ref: str = Field(min_length=1, max_length=255)
    amount: Decimal = Field(default=Decimal(0), ge=0, le=1_000_000)


def fraud_score(order_ref: str, amount: Decimal) -> int:
    """A stand-in model: stable per order, higher for large amounts."""
    base = int(hashlib.sha256(order_ref.encode()).hexdigest()[:4], 16) % 30
    return min(99, base + (40 if amount > 5000 else 0))


def create_payments_app(dsn: str) -> FastAPI:
    """The payments service, storing its effects in the `payments` schema of `dsn`."""
    svc = Participant("payments", dsn, TABLES, COUNTS)
    app = svc.create_app("payments", __doc__ or "")

    @app.post("/charges", status_code=201, summary="Charge an order")
    async def charge(body: ChargeIn, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            if await svc.is_closed(conn, body.order_ref):
                return closed_conflict("charging", body.order_ref)
            charge_id = new_id("ch")
            await conn.execute(
                "INSERT INTO payments.charges (id, order_ref, amount) VALUES (%s, %s, %s)",
                (charge_id, body.order_ref, body.amount),
            )
            return 201, {
                "id": charge_id,
                "order_ref": body.order_ref,
                "amount": float(body.amount),
                "status": "captured",
            }

        return await svc.once(request, body, body.order_ref, effect)

    @app.post("/refunds", summary="Refund an order's charges (a no-op when there are none)")
    async def refund(body: OrderRef, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            cursor = await conn.execute(
                "UPDATE payments.charges SET status = 'refunded', refunded_at = now() "
                "WHERE order_ref = %s AND status = 'captured' RETURNING id, amount",
                (body.order_ref,),
            )
            refunded: list[dict[str, Any]] = []
            for charge_id, amount in await cursor.fetchall():
                await conn.execute(
                    "INSERT INTO payments.refunds (id, order_ref, charge_id, amount) "
                    "VALUES (%s, %s, %s, %s)",
                    (new_id("re"), body.order_ref, charge_id, amount),
                )
                refunded.append({"charge_id": charge_id, "amount": float(amount)})
            await svc.close_order(conn, body.order_ref)
            return 200, {
                "order_ref": body.order_ref,
                "refunded": refunded,
                "amount": round(sum(r["amount"] for r in refunded), 2),
            }

        return await svc.once(request, body, body.order_ref, effect)

    @app.post("/fraud-score", summary="Score an order's fraud risk (0-99)")
    async def score(body: FraudIn, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            value = fraud_score(body.order_ref, body.amount)
            await conn.execute(
                "INSERT INTO payments.fraud_checks (id, order_ref, amount, score) "
                "VALUES (%s, %s, %s, %s)",
                (new_id("fc"), body.order_ref, body.amount, value),
            )
            return 200, {"score": value, "source": "model"}

        return await svc.once(request, body, None, effect)

    app.state.participant = svc
    return app
