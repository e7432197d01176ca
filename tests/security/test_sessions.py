"""The dashboard's sessions end when they are logged out, cookies are Secure behind
https, failed logins are limited per client address, and /metrics can need a token."""

from __future__ import annotations

import re

import httpx

from app.dashboard.auth import COOKIE, LOGIN_FAILURES
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.support.api_helpers import assert_problem, client_for


async def _login(client: httpx.AsyncClient, token: str = ADMIN_TOKEN) -> httpx.Response:
    return await client.post(
        "/admin/login",
        content=f"token={token}&next=/admin",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )


def _cookie(value: str) -> dict[str, str]:
    return {"cookie": f"{COOKIE}={value}"}


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert match, page[:500]
    return match.group(1)


async def test_logout_revokes_the_session_server_side(db_url: str) -> None:
    async with client_for(make_settings(), db_url) as client:
        r = await _login(client)
        assert r.status_code == 303, r.text
        cookie = r.cookies[COOKIE]
        page = await client.get("/admin", headers=_cookie(cookie))
        assert page.status_code == 200
        r = await client.post(
            "/admin/logout",
            content=f"csrf={_csrf(page.text)}",
            headers={"content-type": "application/x-www-form-urlencoded", **_cookie(cookie)},
        )
        assert r.status_code == 303
        # The old cookie, kept by someone who copied it, opens nothing any more.
        again = await client.get("/admin", headers=_cookie(cookie))
        assert again.status_code == 303 and "/admin/login" in again.headers["location"]
        # A second login is a new session; the first stays revoked.
        fresh = (await _login(client)).cookies[COOKIE]
        assert fresh != cookie
        assert (await client.get("/admin", headers=_cookie(fresh))).status_code == 200
        assert (await client.get("/admin", headers=_cookie(cookie))).status_code == 303


async def test_a_session_is_only_what_the_database_knows(db_url: str) -> None:
    async with client_for(make_settings(), db_url) as client:
        for forged in ("x" * 43, "", "%C3%A9", "1.2.3", "a" * 5000):
            r = await client.get("/admin", headers=_cookie(forged))
            assert r.status_code == 303, forged


async def test_cookies_are_secure_behind_https(db_url: str) -> None:
    settings = make_settings(SAGA_PUBLIC_URL="https://saga.example.com")
    async with client_for(settings, db_url) as client:
        r = await _login(client)
    set_cookie = r.headers["set-cookie"].lower()
    assert "secure" in set_cookie and "httponly" in set_cookie
    assert "samesite=strict" in set_cookie
    async with client_for(make_settings(), db_url) as client:
        r = await _login(client)
    assert "secure" not in r.headers["set-cookie"].lower()


async def test_failed_logins_are_rate_limited_per_client_address(db_url: str) -> None:
    async with client_for(make_settings(), db_url) as client:
        for _ in range(LOGIN_FAILURES):
            assert (await _login(client, "wrong")).status_code == 401
        limited = await _login(client, "wrong")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
        # While limited, even the right token is not tried (no oracle for guessing).
        assert (await _login(client)).status_code == 429


async def test_metrics_need_their_token_when_one_is_set(db_url: str) -> None:
    token = "metrics-token-0123456789abcdef"
    async with client_for(make_settings(SAGA_METRICS_TOKEN=token), db_url) as client:
        assert_problem(await client.get("/metrics"), 401)
        assert_problem(await client.get("/metrics", headers={"Authorization": "Bearer no"}), 401)
        ok = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "saga_sagas" in ok.text
        admin = await client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 200
    async with client_for(make_settings(), db_url) as client:
        assert (await client.get("/metrics")).status_code == 200  # open without a token


async def test_metrics_read_no_finished_saga(db_url: str) -> None:
    """/metrics is answered from indexes over sagas in flight: its plan touches no row of
    a finished saga, however many there are."""
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO definitions (name, version, content_hash, spec)
            VALUES ('hist', 1, 'x', '{"name": "hist", "steps": []}');
            INSERT INTO sagas (id, definition_id, definition_name, definition_version, status,
                               input, finished_at)
            SELECT gen_random_uuid(), d.id, 'hist', 1, 'completed', '{}', now()
              FROM definitions d, generate_series(1, 20000) WHERE d.name = 'hist';
            ANALYZE sagas;
            """
        )
        plan = conn.execute(
            "EXPLAIN (FORMAT JSON) SELECT definition_name, status, count(*) FROM sagas "
            "WHERE status IN ('running', 'compensating') GROUP BY definition_name, status"
        ).fetchone()
    assert plan is not None
    assert "ix_sagas_active" in str(plan[0]), plan[0]
    async with client_for(make_settings(), db_url) as client:
        body = (await client.get("/metrics")).text
    assert 'status="completed"' not in body.split("saga_sagas{", 1)[-1].split("\n# ")[0]
