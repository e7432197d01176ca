"""The payments participant: charges, refunds and a fraud score.

POST /charges      {amount, order_ref}  -> 201 {id, order_ref, amount, status: captured}
                   A callback step's call (it carries X-Saga-Callback-URL) is confirmed
                   by the payment provider asynchronously: 202 {..., status: pending} at
                   once, then, a moment later, a report to that URL: `succeeded` with
                   {id, order_ref, amount, status: captured}, or `failed` when the card
                   is declined. The same Idempotency-Key again (a retry after the wait
                   timed out carries a new URL) answers the same 202 and reports the
                   charge's outcome, decided once, to the newest URL.
POST /refunds      {order_ref}          -> 200: refunds that order's captured charges and
                   voids its pending ones; none is fine
POST /fraud-score  {order_ref, amount}  -> 200 {score, source}
POST /_provider    {confirm_delay_seconds, decline}: how the provider confirms (`{}`
                   resets it); GET /_provider shows that and how its reports were answered
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app.client import CALLBACK_URL_HEADER, ApiError, CallbackReporter
from examples.checkout.kit import Connection, OrderRef, Participant, closed_conflict, new_id

log = logging.getLogger(__name__)

TABLES = (
    """CREATE TABLE IF NOT EXISTS payments.charges (
        id text PRIMARY KEY,
        order_ref text NOT NULL,
        amount numeric(12, 2) NOT NULL,
        status text NOT NULL DEFAULT 'captured',
        created_at timestamptz NOT NULL DEFAULT now(),
        refunded_at timestamptz)""",
    "CREATE INDEX IF NOT EXISTS charges_order_ref ON payments.charges (order_ref)",
    # pending -> captured | declined (the provider's confirmation) | voided (undone first)
    "ALTER TABLE payments.charges ADD COLUMN IF NOT EXISTS decline_reason text",
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
    "charges_declined": f"SELECT count(*) FROM payments.charges {_FOR_REF} AND status = 'declined'",
    "charges_voided": f"SELECT count(*) FROM payments.charges {_FOR_REF} AND status = 'voided'",
    "refunds": f"SELECT count(*) FROM payments.refunds {_FOR_REF}",
    "fraud_checks": f"SELECT count(*) FROM payments.fraud_checks {_FOR_REF}",
}


class ChargeIn(BaseModel):
    amount: Decimal = Field(gt=0, le=1_000_000, decimal_places=2)
    order_ref: str = Field(min_length=1, max_length=255)


class FraudIn(BaseModel):
    order_ref: str = Field(min_length=1, max_length=255)
    amount: Decimal = Field(default=Decimal(0), ge=0, le=1_000_000)


class Provider(BaseModel):
    """How the payment provider confirms a callback step's charge; `{}` is the default."""

    model_config = ConfigDict(extra="forbid")

    confirm_delay_seconds: float = Field(
        default=0.3, ge=0.0, le=600.0, description="how long a confirmation takes"
    )
    decline: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="decline every pending charge, with this reason",
    )


def fraud_score(order_ref: str, amount: Decimal) -> int:
    """A stand-in model: stable per order, higher for large amounts."""
    base = int(hashlib.sha256(order_ref.encode()).hexdigest()[:4], 16) % 30
    return min(99, base + (40 if amount > 5000 else 0))


def create_payments_app(dsn: str) -> FastAPI:
    """The payments service, storing its effects in the `payments` schema of `dsn`."""
    svc = Participant("payments", dsn, TABLES, COUNTS)
    app = svc.create_app("payments", __doc__ or "")

    provider = Confirmations(svc)
    svc.on_shutdown.append(provider.stop)

    @app.post("/charges", status_code=201, summary="Charge an order")
    async def charge(body: ChargeIn, request: Request) -> JSONResponse:
        callback_url = request.headers.get(CALLBACK_URL_HEADER)

        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            if await svc.is_closed(conn, body.order_ref):
                return closed_conflict("charging", body.order_ref)
            charge_id = new_id("ch")
            status = "pending" if callback_url else "captured"
            await conn.execute(
                "INSERT INTO payments.charges (id, order_ref, amount, status) "
                "VALUES (%s, %s, %s, %s)",
                (charge_id, body.order_ref, body.amount, status),
            )
            return 202 if callback_url else 201, {
                "id": charge_id,
                "order_ref": body.order_ref,
                "amount": float(body.amount),
                "status": status,
            }

        answer = await svc.once(request, body, body.order_ref, effect)
        if callback_url and answer.status_code == 202:
            # First time or a repeat (with the newest URL): report the charge's outcome.
            provider.confirm(json.loads(bytes(answer.body))["id"], callback_url)
        return answer

    @app.get("/_provider", summary="How the payment provider confirms, and its reports")
    async def get_provider() -> dict[str, Any]:
        return {"settings": provider.settings.model_dump(), "reports": dict(provider.reports)}

    @app.post("/_provider", summary="Make the payment provider slower, or decline charges")
    async def set_provider(settings: Provider) -> Provider:
        provider.settings = settings
        return settings

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
            # Not confirmed yet: the provider will not capture it (its report says so).
            await conn.execute(
                "UPDATE payments.charges SET status = 'voided' "
                "WHERE order_ref = %s AND status = 'pending'",
                (body.order_ref,),
            )
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


class Confirmations:
    """The payment provider's side: each pending charge is decided once (captured, or
    declined), a moment after the call, and its outcome reported to the callback URL
    with one pooled `CallbackReporter`. A report that is refused (409: the attempt's
    wait is over, or the saga moved on) is dropped: the retry, if any, brings a new URL.
    The URLs are credentials, so they are never logged."""

    def __init__(self, svc: Participant) -> None:
        self.svc = svc
        self.settings = Provider()
        self.reports: Counter[str] = Counter()  # taken, refused_409, unreachable, ...
        self._reporter = CallbackReporter(retry_for_seconds=30)
        self._tasks: set[asyncio.Task[None]] = set()

    def confirm(self, charge_id: str, callback_url: str) -> None:
        task = asyncio.create_task(self._confirm(charge_id, callback_url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reporter.aclose()

    async def _confirm(self, charge_id: str, callback_url: str) -> None:
        await asyncio.sleep(self.settings.confirm_delay_seconds)
        status, response, error = await self._decide(charge_id)
        try:
            await self._reporter.report(callback_url, status, response, error)
            self.reports["taken"] += 1
        except ApiError as exc:
            self.reports[f"refused_{exc.status}"] += 1
            log.info("charge %s: report refused (%s)", charge_id, exc.status)
        except httpx.HTTPError as exc:
            self.reports["unreachable"] += 1
            log.warning("charge %s: orchestrator unreachable (%s)", charge_id, type(exc).__name__)

    async def _decide(self, charge_id: str) -> tuple[str, Any, str | None]:
        """Capture or decline a pending charge (once: in the order's lock, in one
        transaction); the report its state calls for."""
        decline = self.settings.decline
        async with self.svc.pool.connection() as conn, conn.transaction():
            found = await (
                await conn.execute(
                    "SELECT order_ref FROM payments.charges WHERE id = %s", (charge_id,)
                )
            ).fetchone()
            if found is None:  # pragma: no cover - the 202 was answered for this charge
                return "failed", None, f"no charge {charge_id}"
            await self.svc.lock(conn, found[0])
            row = await (
                await conn.execute(
                    "SELECT order_ref, amount, status, decline_reason FROM payments.charges "
                    "WHERE id = %s FOR UPDATE",
                    (charge_id,),
                )
            ).fetchone()
            assert row is not None
            order_ref, amount, state, reason = row
            if state == "pending":
                state, reason = ("declined", decline) if decline else ("captured", None)
                await conn.execute(
                    "UPDATE payments.charges SET status = %s, decline_reason = %s WHERE id = %s",
                    (state, reason, charge_id),
                )
        if state == "declined":
            return "failed", None, f"card declined: {reason}"
        if state == "voided":
            return "failed", None, "charge voided: the order was undone before it was confirmed"
        return (
            "succeeded",
            {"id": charge_id, "order_ref": order_ref, "amount": float(amount), "status": state},
            None,
        )
