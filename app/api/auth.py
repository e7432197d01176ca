"""Bearer-token checks: constant-time comparison; the admin token also opens /v1/.

`check` is the one rule; the ASGI guard applies it before a body is read, and the route
dependencies apply it again to learn the caller's token id for the audit log.
"""

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
        return expected is not None and hmac.compare_digest(given.encode(), expected.encode())

    @staticmethod
    def token_id(token: str) -> str:
        """A short, non-secret name for a token, for the audit log."""
        return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:10]


def bearer(authorization: str | None) -> str | None:
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check(tokens: Tokens, authorization: str | None, admin: bool) -> Problem | str | None:
    """The caller's token id when allowed (None: open API, no token needed), else a Problem."""
    given = bearer(authorization)
    if not admin and tokens.api is None:
        return Tokens.token_id(given) if given else None
    if given is None:
        what = "admin token" if admin else "token"
        return Problem(
            401,
            f"send Authorization: Bearer <{what}>",
            slug="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if Tokens.matches(given, tokens.admin):
        return Tokens.token_id(given)
    if admin:
        if Tokens.matches(given, tokens.api):
            return Problem(403, "this endpoint needs the admin token", slug="forbidden")
        return Problem(
            401,
            "the bearer token is not valid",
            slug="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if Tokens.matches(given, tokens.api):
        return Tokens.token_id(given)
    return Problem(
        401,
        "the bearer token is not valid",
        slug="unauthorized",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_api(request: Request) -> str | None:
    """When SAGA_API_TOKEN is set, /v1/ needs it (or the admin token)."""
    result = check(request.app.state.ctx.tokens, request.headers.get("authorization"), False)
    if isinstance(result, Problem):
        raise result
    return result


def require_admin(request: Request) -> str:
    """/v1/admin/* always needs the admin token. Returns its id for the audit log."""
    result = check(request.app.state.ctx.tokens, request.headers.get("authorization"), True)
    if isinstance(result, Problem):
        raise result
    assert result is not None
    return result
