"""Bearer-token checks: constant-time comparison; the admin token also opens /v1/."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from app.api.problems import Problem


@dataclass(frozen=True, slots=True)
class Tokens:
    api: str | None
    admin: str

    @staticmethod
    def matches(given: str, expected: str | None) -> bool:
        """Constant-time comparison; never equal to an unset token."""
        return _matches(given, expected)

    @staticmethod
    def token_id(token: str) -> str:
        """A short, non-secret name for a token, for the audit log."""
        return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:10]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _matches(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def require_api(request: Request) -> str | None:
    """When SAGA_API_TOKEN is set, /v1/ needs it (or the admin token). Returns the token id."""
    tokens: Tokens = request.app.state.ctx.tokens
    if tokens.api is None:
        return None
    given = _bearer(request)
    if given is None:
        raise _unauthorized("send Authorization: Bearer <token>")
    if _matches(given, tokens.api) or _matches(given, tokens.admin):
        return Tokens.token_id(given)
    raise _unauthorized("the bearer token is not valid")


def require_admin(request: Request) -> str:
    """/v1/admin/* always needs the admin token. Returns its id for the audit log."""
    tokens: Tokens = request.app.state.ctx.tokens
    given = _bearer(request)
    if given is None:
        raise _unauthorized("send Authorization: Bearer <admin token>")
    if not _matches(given, tokens.admin):
        raise Problem(403, "this endpoint needs the admin token", slug="forbidden")
    return Tokens.token_id(given)
