"""Bearer-token checks: constant-time comparison; the admin token also opens /v1/.

`check` is the one rule; the ASGI guard applies it before a body is read, and the route
dependencies apply it again to learn the caller's token id for the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

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


class Access(Enum):
    """What a request needs (contract §2, "Who may do what")."""

    API = "api"  # start, read, cancel sagas; read services and definitions
    REGISTER = "register"  # register, replace or delete services and definitions
    ADMIN = "admin"  # /v1/admin/* and the dashboard
    CALLBACK = "callback"  # a participant's report: the token in the path is the credential


ANONYMOUS = "anonymous"  # the actor of a registration on an open API


def access_for(method: str, path: str) -> Access:
    """Which access a /v1 request needs, from its method and path alone (so it can be
    decided before the body is read)."""
    if path.startswith("/v1/admin/"):
        return Access.ADMIN
    if path.startswith("/v1/callbacks/"):
        return Access.CALLBACK
    writes = method in ("PUT", "POST", "PATCH", "DELETE")
    if writes and (path.startswith("/v1/services/") or path.rstrip("/") == "/v1/definitions"):
        return Access.REGISTER
    return Access.API


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def check(tokens: Tokens, authorization: str | None, access: Access) -> Problem | str | None:
    """The caller's token id when allowed (None: open API, no token given), else a Problem.

    Without SAGA_API_TOKEN the API, registrations included, is open; with it, the API
    token may use the API and the admin token may do everything. The admin endpoints
    always need the admin token.
    """
    given = bearer(authorization)
    if access is Access.CALLBACK:
        return None
    if access is not Access.ADMIN and tokens.api is None:
        return Tokens.token_id(given) if given else None
    if given is None:
        return _unauthorized(
            f"send Authorization: Bearer <{'token' if access is Access.API else 'admin token'}>"
        )
    if Tokens.matches(given, tokens.admin):
        return Tokens.token_id(given)
    if Tokens.matches(given, tokens.api):
        if access is Access.API:
            return Tokens.token_id(given)
        what = "registering services and definitions" if access is Access.REGISTER else "this"
        return Problem(403, f"{what} needs the admin token", slug="forbidden")
    return _unauthorized("the bearer token is not valid")


def _require(request: Request, access: Access) -> str | None:
    result = check(request.app.state.ctx.tokens, request.headers.get("authorization"), access)
    if isinstance(result, Problem):
        raise result
    return result


async def require_api(request: Request) -> str | None:
    """When SAGA_API_TOKEN is set, /v1/ needs it (or the admin token)."""
    return _require(request, Access.API)


async def require_registrar(request: Request) -> str:
    """Registering needs the admin token when SAGA_API_TOKEN is set. Returns the actor
    for the audit log: the token's id, or `anonymous` on an open API."""
    return _require(request, Access.REGISTER) or ANONYMOUS


async def require_admin(request: Request) -> str:
    """/v1/admin/* always needs the admin token. Returns its id for the audit log."""
    result = _require(request, Access.ADMIN)
    assert result is not None
    return result
