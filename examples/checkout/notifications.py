"""The notifications participant.

POST /emails  {to, order_ref, order_id} -> 202 {id, to, status}
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from examples.checkout.kit import Connection, Participant, new_id

TABLES = (
    """CREATE TABLE IF NOT EXISTS notifications.emails (
        id text PRIMARY KEY,
        order_ref text,
        recipient text NOT NULL,
        subject text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE INDEX IF NOT EXISTS emails_order_ref ON notifications.emails (order_ref)",
)

COUNTS = {
    "emails": (
        "SELECT count(*) FROM notifications.emails "
        "WHERE (%(ref)s::text IS NULL OR order_ref = %(ref)s)"
    ),
}


class EmailIn(BaseModel):
    to: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    order_ref: str | None = Field(default=None, max_length=255)
    order_id: str | None = Field(default=None, max_length=255)


def create_notifications_app(dsn: str) -> FastAPI:
    """The notifications service, storing its effects in the `notifications` schema."""
    svc = Participant("notifications", dsn, TABLES, COUNTS)
    app = svc.create_app("notifications", __doc__ or "")

    @app.post("/emails", status_code=202, summary="Queue an email")
    async def send(body: EmailIn, request: Request) -> JSONResponse:
        async def effect(conn: Connection) -> tuple[int, dict[str, Any]]:
            email_id = new_id("em")
            subject = f"Your order {body.order_id or body.order_ref or ''}".strip()
            await conn.execute(
                "INSERT INTO notifications.emails (id, order_ref, recipient, subject) "
                "VALUES (%s, %s, %s, %s)",
                (email_id, body.order_ref, body.to, subject),
            )
            return 202, {"id": email_id, "to": body.to, "status": "queued"}

        return await svc.once(request, body, body.order_ref, effect)

    app.state.participant = svc
    return app
