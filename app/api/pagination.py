"""Opaque list cursors and the shared `limit`/`cursor` query parameters."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query

from app.api.problems import Problem
from app.core import patterns

Limit = Annotated[int, Query(ge=1, le=500, description="Page size, 1-500.")]
# Opaque: only a `next_cursor` works, so the pattern gives its shape, and anything else
# is a 400 (`bad-cursor`), documented with each list. The pattern is not enforced here:
# a cursor of another shape is a bad cursor like any other.
Cursor = Annotated[
    str | None,
    Query(
        max_length=512,
        description="Opaque: the `next_cursor` of the previous page, unchanged (url-safe "
        "base64); any other value is a `400` (`bad-cursor`). Absent: the first page.",
        json_schema_extra={"pattern": patterns.CURSOR},
        examples=["InBheW1lbnRzIg"],
    ),
]


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Any:
    if cursor is None:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        raise bad_cursor() from None


def decode_time_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """A (created_at, id) keyset cursor of a newest-first list."""
    raw = decode_cursor(cursor)
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw[0]), uuid.UUID(raw[1])
    except (TypeError, ValueError, IndexError, KeyError):
        raise bad_cursor() from None


def time_cursor_after(items: Sequence[Any], limit: int) -> str | None:
    """The next page's cursor: the last item's (created_at, id), when the page was full."""
    if len(items) < limit:
        return None
    last = items[-1]
    return encode_cursor([last.created_at.isoformat(), str(last.id)])


def valid_offset(value: object) -> bool:
    """An id cursor: a non-negative bigint (bool is an int in Python, so exclude it)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def bad_cursor() -> Problem:
    return Problem(
        400,
        "cursor is not valid: pass next_cursor from a previous page unchanged",
        slug="bad-cursor",
        errors=[{"loc": ["query", "cursor"], "msg": "invalid cursor", "type": "value_error"}],
    )
