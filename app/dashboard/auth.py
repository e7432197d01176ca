"""Dashboard sessions and login limits.

A session is a random secret in an HttpOnly, SameSite=Strict cookie (Secure when the
service is served over https); the database keeps its SHA-256 and every request checks
it, so logging out ends the session at once, on every replica. CSRF tokens are an HMAC of
the cookie under a key derived from the admin token. Failed logins are limited per
client address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque

COOKIE = "saga_admin"
SESSION_SECONDS = 8 * 3600
LOGIN_FAILURES = 10  # failed logins allowed per client address ...
LOGIN_WINDOW_SECONDS = 300.0  # ... in this many seconds


def new_secret() -> str:
    """A session's cookie value: 256 random bits."""
    return secrets.token_urlsafe(32)


def digest(cookie: str) -> str:
    """What the database keeps of a session: never the cookie itself."""
    return hashlib.sha256(cookie.encode()).hexdigest()


def _key(admin_token: str) -> bytes:
    return hashlib.sha256(b"saga-dashboard-csrf:" + admin_token.encode()).digest()


def csrf_token(admin_token: str, cookie: str) -> str:
    return hmac.new(_key(admin_token), b"csrf:" + cookie.encode(), hashlib.sha256).hexdigest()


def valid_csrf(admin_token: str, cookie: str | None, token: str | None) -> bool:
    if not cookie or not token:
        return False
    return hmac.compare_digest(token.encode(), csrf_token(admin_token, cookie).encode())


class LoginLimiter:
    """At most LOGIN_FAILURES failed logins per client address in a sliding window; a
    success does not reset it (an attacker with one right guess is done anyway)."""

    def __init__(
        self, failures: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW_SECONDS
    ) -> None:
        self.failures = failures
        self.window = window
        self._seen: dict[str, deque[float]] = {}

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until this client may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        times = self._seen.get(client)
        if not times:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._seen[client]
            return 0.0
        if len(times) < self.failures:
            return 0.0
        return times[0] + self.window - now

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._seen.setdefault(client, deque()).append(now)
        if len(self._seen) > 100_000:  # bound the memory a flood of addresses can take
            oldest = min(self._seen, key=lambda c: self._seen[c][-1])
            del self._seen[oldest]
