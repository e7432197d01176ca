"""A refusal of a use case, shaped as the RFC 9457 problem the API answers with.

The use cases decide which refusal is which (unknown: 404; conflict with the saga's
state: 409; bad input: 422); the API only renders it.
"""

from __future__ import annotations

from typing import Any


class Problem(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.errors = errors or []
        self.headers = headers or {}


__all__ = ["Problem"]
