"""Dashboard sessions: an HMAC-signed, expiring HttpOnly cookie, and CSRF tokens bound to it.

The signing key is derived from the admin token, so rotating the token logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import time

COOKIE = "saga_admin"
SESSION_SECONDS = 8 * 3600


def _key(admin_token: str) -> bytes:
    return hashlib.sha256(b"saga-dashboard-session:" + admin_token.encode()).digest()


def _sign(admin_token: str, payload: str) -> str:
    return hmac.new(_key(admin_token), payload.encode(), hashlib.sha256).hexdigest()


def new_session(admin_token: str, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_SECONDS)
    nonce = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:16]
    payload = f"{expires}.{nonce}"
    return f"{payload}.{_sign(admin_token, payload)}"


def valid_session(admin_token: str, cookie: str | None, now: float | None = None) -> bool:
    if not cookie or cookie.count(".") != 2:
        return False
    expires, nonce, signature = cookie.split(".")
    payload = f"{expires}.{nonce}"
    if not hmac.compare_digest(signature.encode(), _sign(admin_token, payload).encode()):
        return False
    return expires.isdigit() and int(expires) > (now or time.time())


def csrf_token(admin_token: str, cookie: str) -> str:
    return _sign(admin_token, "csrf:" + cookie)


def valid_csrf(admin_token: str, cookie: str | None, token: str | None) -> bool:
    if not cookie or not token:
        return False
    return hmac.compare_digest(token.encode(), csrf_token(admin_token, cookie).encode())
