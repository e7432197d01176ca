"""The operator dashboard in a real browser (Playwright + Debian's Chromium) against the
orchestrator served over real HTTP, with real sagas behind it.

Screenshots of every page go to test-artifacts/dashboard/; with
SAGA_UPDATE_DOCS_SCREENSHOT=1 the overview after a varied run is also written to
docs/dashboard.png.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.conftest import ADMIN_TOKEN, wait_terminal
from tests.support.browser import (
    CHROMIUM,
    DOCS_SCREENSHOT,
    LAUNCH_ARGS,
    MISSING,
    in_ci,
    screenshot,
    update_docs,
)
from tests.support.servers import Participant, Reply

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COOKIE = "saga_admin"


# --- the browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium. Missing: a failure in CI (it must run there), else a skip."""
    if not CHROMIUM.exists():
        if in_ci():
            pytest.fail(f"{CHROMIUM} does not exist; CI must run the dashboard tests. {MISSING}")
        pytest.skip(MISSING)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Dash:
    """One browser context (its own cookies) pointed at one orchestrator."""

    context: BrowserContext
    page: Page
    base: str

    async def goto(self, path: str) -> int:
        response = await self.page.goto(self.base + path)
        assert response is not None
        return response.status

    async def login(self) -> None:
        await self.goto("/admin/login")
        await self.page.fill("#token", ADMIN_TOKEN)
        await self.page.get_by_role("button", name="Log in").click()
        await self.page.wait_for_url(self.base + "/admin")
        await self.page.locator("h1", has_text="Overview").wait_for()

    async def shot(self, name: str) -> None:
        await screenshot(self.page, name)

    async def session_cookie(self) -> dict[str, Any] | None:
        cookies = [c for c in await self.context.cookies() if c["name"] == COOKIE]
        return dict(cookies[0]) if cookies else None

    def path(self) -> str:
        return self.page.url.removeprefix(self.base)


async def new_dash(browser: Browser, base: str) -> Dash:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    return Dash(context, await context.new_page(), base)


@pytest.fixture
async def dash(browser: Browser, orchestrator: httpx.AsyncClient) -> AsyncIterator[Dash]:
    d = await new_dash(browser, str(orchestrator.base_url).rstrip("/"))
    try:
        yield d
    finally:
        await d.context.close()


# --- sagas to look at -------------------------------------------------------------------


def fast_retry(max_attempts: int = 3, interval: float = 0.05) -> dict[str, Any]:
    return {
        "max_attempts": max_attempts,
        "initial_interval_seconds": interval,
        "backoff_coefficient": 1.0,
        "max_interval_seconds": max(interval, 0.1),
        "jitter": False,
    }


def step(
    name: str, service: str = "shop", *, compensate: bool = True, **extra: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": service, "path": f"/{name}", "body": {"order": "${input.order}"}},
        "retry": fast_retry(),
        "compensation_retry": fast_retry(),
    }
    if compensate:
        doc["compensation"] = {"service": service, "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


async def setup_checkout(client: httpx.AsyncClient, participant: Participant) -> None:
    """Services `shop` and `mail`; `checkout` = reserve, charge, receipt (non-critical)."""
    for name in ("shop", "mail"):
        r = await client.put(f"/v1/services/{name}", json={"base_url": participant.url})
        assert r.status_code in (200, 201), r.text
    r = await client.post(
        "/v1/definitions",
        json={
            "name": "checkout",
            "steps": [
                step("reserve"),
                step("charge"),
                step("receipt", "mail", compensate=False, critical=False),
            ],
        },
    )
    assert r.status_code in (200, 201), r.text


async def run(client: httpx.AsyncClient, definition: str = "checkout", **input_: Any) -> Any:
    r = await client.post(
        "/v1/sagas", json={"definition": definition, "input": {"order": 1, **input_}}
    )
    assert r.status_code == 201, r.text
    return await wait_terminal(client, r.json()["id"])


async def declined(client: httpx.AsyncClient, participant: Participant) -> Any:
    """A saga whose charge is declined (400): reserve is compensated."""
    participant.script("/charge", Reply(400, {"error": "card declined"}))
    saga = await run(client)
    assert saga["status"] == "compensated", saga
    return saga


async def with_open_dead_letter(client: httpx.AsyncClient, participant: Participant) -> Any:
    """A completed saga whose non-critical receipt failed with 400: one open dead letter."""
    participant.script("/receipt", Reply(400, {"error": "bad address"}))
    saga = await run(client)
    assert saga["status"] == "completed", saga
    assert saga["steps"][2]["status"] == "failed", saga
    return saga


async def open_dead_letters(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await client.get("/v1/admin/dead-letters", params={"status": "open"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def dashboard_json(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/v1/admin/dashboard", headers=ADMIN)
    assert r.status_code == 200, r.text
    board: dict[str, Any] = r.json()
    return board


async def number(page: Page, element_id: str) -> int:
    text = (await page.locator(f"#{element_id}").text_content() or "").strip()
    assert text.isdigit(), f"#{element_id} shows {text!r}"
    return int(text)


# --- sessions ---------------------------------------------------------------------------

PAGES = ["/admin", "/admin/sagas", "/admin/dead-letters?status=open", "/admin/services"]
PAGES += ["/admin/audit", f"/admin/sagas/{uuid.uuid4()}"]
PAGES += ["/admin/definitions", "/admin/definitions/checkout/versions/1"]


async def test_pages_without_a_session_redirect_to_login(dash: Dash) -> None:
    for path in PAGES:
        await dash.goto(path)
        assert dash.path().partition("?")[0] == "/admin/login", (
            f"{path} was shown without a session"
        )
        assert await dash.page.locator("#token").is_visible()
    # No navigation for strangers.
    assert await dash.page.locator("header a[href='/admin/sagas']").count() == 0
    await dash.shot("login")

    # A forged or expired cookie is no session either.
    for forged in ("9999999999.0123456789abcdef.00", "1.0123456789abcdef.00", "garbage"):
        await dash.context.add_cookies(
            [{"name": COOKIE, "value": forged, "url": dash.base + "/admin"}]
        )
        await dash.goto("/admin")
        assert dash.path().partition("?")[0] == "/admin/login", forged


async def test_login_returns_to_the_page_asked_for_and_never_leaves_the_dashboard(
    dash: Dash,
) -> None:
    await dash.goto("/admin/audit")
    assert dash.path() == "/admin/login?next=%2Fadmin%2Faudit"
    await dash.page.fill("#token", ADMIN_TOKEN)
    await dash.page.get_by_role("button", name="Log in").click()
    await dash.page.wait_for_url(dash.base + "/admin/audit")
    await dash.page.locator("h1", has_text="Audit log").wait_for()

    # A `next` outside the dashboard is ignored: no open redirect.
    await dash.context.clear_cookies()
    for target in ("//evil.example/admin", "https://evil.example/", "/v1/sagas"):
        await dash.goto(f"/admin/login?next={target}")
        await dash.page.fill("#token", ADMIN_TOKEN)
        await dash.page.get_by_role("button", name="Log in").click()
        await dash.page.wait_for_url(dash.base + "/admin")
        await dash.context.clear_cookies()


async def test_a_wrong_token_is_refused(dash: Dash) -> None:
    await dash.goto("/admin/login")
    await dash.page.fill("#token", "not-the-admin-token")
    async with dash.page.expect_response(
        lambda r: r.url.endswith("/admin/login") and r.request.method == "POST"
    ) as answer:
        await dash.page.get_by_role("button", name="Log in").click()
    assert (await answer.value).status == 401
    await dash.page.locator("#error").wait_for()
    assert "not the admin token" in (await dash.page.locator("#error").text_content() or "")
    assert dash.path().partition("?")[0] == "/admin/login"
    assert await dash.session_cookie() is None
    await dash.shot("login-refused")
    await dash.goto("/admin")
    assert dash.path().partition("?")[0] == "/admin/login"


async def test_login_sets_a_strict_http_only_cookie_and_logout_ends_the_session(
    dash: Dash,
) -> None:
    before = time.time()
    await dash.login()
    cookie = await dash.session_cookie()
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/admin"
    assert before + 7 * 3600 < cookie["expires"] < time.time() + 9 * 3600  # 8 hours
    # Scripts on the page cannot read it.
    assert COOKIE not in await dash.page.evaluate("document.cookie")

    await dash.page.get_by_role("button", name="Log out").click()
    await dash.page.wait_for_url(dash.base + "/admin/login")
    assert await dash.session_cookie() is None
    for path in PAGES:
        await dash.goto(path)
        assert dash.path().partition("?")[0] == "/admin/login", f"{path} still shown after logout"


# --- what the pages show ----------------------------------------------------------------


async def test_overview_counts_match_the_dashboard_json(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """A varied run: completed, compensated and failed sagas, and open dead letters."""
    await setup_checkout(orchestrator, participant)
    for i in range(4):
        assert (await run(orchestrator, n=i))["status"] == "completed"
    for _ in range(2):
        await declined(orchestrator, participant)
    # Declined, and the reservation cannot be released: the saga fails, a dead letter holds it.
    participant.script("/charge", Reply(400, {"error": "card declined"}))
    participant.script("/reserve/undo", Reply(400, {"error": "reservation locked"}))
    failed = await run(orchestrator)
    assert failed["status"] == "failed", failed
    await with_open_dead_letter(orchestrator, participant)

    board = await dashboard_json(orchestrator)
    assert board["sagas_by_status"]["completed"] == 5
    assert board["sagas_by_status"]["compensated"] == 2
    assert board["sagas_by_status"]["failed"] == 1
    assert board["dead_letters_open"] == 2
    assert board["in_flight"] == 0

    await dash.login()
    page = dash.page
    for status, count in board["sagas_by_status"].items():
        assert await number(page, f"count-{status}") == count, status
    assert await number(page, "count-completed") == board["sagas_by_status"]["completed"]
    assert await number(page, "count-compensated") == board["sagas_by_status"]["compensated"]
    assert await number(page, "dead-letters-open") == board["dead_letters_open"]
    assert await number(page, "in-flight") == board["in_flight"]
    # The failed saga is among the recent failures, with its error.
    row = page.locator(f"tr:has(a[href='/admin/sagas/{failed['id']}'])")
    assert "failed" in (await row.text_content() or "")
    # The throughput chart has a bar per 5-minute bucket.
    assert await page.locator("svg[aria-label='throughput chart'] g.bucket").count() == 12

    await dash.shot("overview")
    if update_docs():
        await screenshot(page, "overview", path=DOCS_SCREENSHOT)


async def test_compensated_saga_page_shows_action_and_compensation_bars(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    assert (await run(orchestrator))["status"] == "completed"
    participant.script("/reserve", Reply(503), Reply(200))  # one retry first
    saga = await declined(orchestrator, participant)

    await dash.login()
    await dash.goto("/admin/sagas")
    assert await dash.page.locator("table#sagas tr").count() == 3  # header + 2 sagas
    await dash.shot("sagas")
    await dash.page.click(f"table#sagas a[href='/admin/sagas/{saga['id']}']")
    await dash.page.wait_for_url(f"{dash.base}/admin/sagas/{saga['id']}")
    page = dash.page
    assert (await page.locator("#saga-status").text_content() or "").strip() == "compensated"

    bars = page.locator("svg#timeline rect.bar")
    assert await page.locator("svg#timeline rect.bar.action").count() == 3  # reserve x2, charge
    assert await page.locator("svg#timeline rect.bar.action.retryable").count() == 1
    assert await page.locator("svg#timeline rect.bar.compensation").count() >= 1
    assert await page.locator("svg#timeline rect.bar.compensation.succeeded").count() == 1
    assert await bars.count() == 4

    failed_bar = page.locator("svg#timeline rect.bar.action.failed")
    assert await failed_bar.count() == 1
    await failed_bar.hover()
    hover = await failed_bar.locator("title").text_content() or ""
    assert "charge" in hover
    assert "400" in hover
    assert "card declined" in hover
    retry_hover = await page.locator("svg#timeline rect.bar.retryable title").text_content()
    assert "503" in (retry_hover or "")

    events = page.locator("table#events")
    assert await events.locator("tr", has_text="attempt_finished").count() == 4
    assert await events.locator("tr", has_text="saga_compensated").count() == 1
    # A finished saga waits for nothing and would compensate nothing.
    assert await page.locator("#waiting").count() == 0
    assert await page.locator("#would-compensate").count() == 0
    await dash.shot("saga-detail")


async def test_a_waiting_saga_says_why_and_what_would_be_compensated(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    r = await orchestrator.post(
        "/v1/definitions",
        json={
            "name": "slow-retry",
            "steps": [step("reserve"), step("charge", retry=fast_retry(3, interval=60))],
        },
    )
    assert r.status_code == 201, r.text
    participant.always("/charge", Reply(503, {"error": "try later"}))
    r = await orchestrator.post(
        "/v1/sagas", json={"definition": "slow-retry", "input": {"order": 7}}
    )
    saga_id = r.json()["id"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(participant.to("/charge")) < 1 or not await _retry_scheduled(orchestrator, saga_id):
        assert loop.time() < deadline, "the charge was not tried"
        await asyncio.sleep(0.05)

    await dash.login()
    assert await number(dash.page, "in-flight") == 1
    assert await number(dash.page, "count-running") == 1
    await dash.goto(f"/admin/sagas/{saga_id}")
    page = dash.page
    waiting = await page.locator("#waiting").text_content() or ""
    assert "retry due at" in waiting
    assert "503" in waiting
    would = await page.locator("#would-compensate").text_content() or ""
    assert re.search(r"charge\s*→\s*reserve", would), would
    assert await page.locator("svg#timeline rect.bar.action.retryable").count() == 1
    await dash.shot("saga-waiting")


async def test_a_step_waiting_for_its_callback_is_shown_with_its_due_time(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """A callback step whose participant answered 202: the list marks the saga, its page
    says until when the step waits, the timeline draws the wait; the report ends it."""
    await setup_checkout(orchestrator, participant)
    r = await orchestrator.post(
        "/v1/definitions",
        json={
            "name": "async-pay",
            "steps": [step("reserve"), step("charge", callback={"timeout_seconds": 600})],
        },
    )
    assert r.status_code == 201, r.text
    participant.script("/charge", Reply(202, {"accepted": True}))
    r = await orchestrator.post(
        "/v1/sagas", json={"definition": "async-pay", "input": {"order": 9}}
    )
    saga_id = r.json()["id"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        saga = (await orchestrator.get(f"/v1/sagas/{saga_id}")).json()
        charge = saga["steps"][1]
        if charge["status"] == "waiting":
            break
        assert loop.time() < deadline, f"charge is {charge['status']}, not waiting"
        await asyncio.sleep(0.05)
    due = datetime.fromisoformat(charge["callback_due_at"])
    until = due.strftime("%H:%M:%S")

    await dash.login()
    await dash.goto("/admin/sagas")
    row = dash.page.locator(f"table#sagas tr:has(a[href='/admin/sagas/{saga_id}'])")
    assert await row.locator(".waiting-callback").count() == 1
    assert "waiting for a callback" in (await row.text_content() or "")
    await dash.shot("sagas-callback-waiting")

    await dash.goto(f"/admin/sagas/{saga_id}")
    page = dash.page
    assert (await page.locator("#saga-status").text_content() or "").strip() == "running"
    waiting = await page.locator("#waiting").text_content() or ""
    assert f"step 'charge' is waiting for its callback until {until}" in waiting, waiting
    assert "retry due" not in waiting
    charge_row = page.locator("table#steps tr#step-charge.waiting-callback")
    assert await charge_row.count() == 1
    assert (await charge_row.locator(".status").text_content() or "").strip() == "waiting"
    cell = await charge_row.locator(".callback-due").text_content() or ""
    assert cell == f"waiting for its callback until {until}", cell
    assert await page.locator("table#steps tr.waiting-callback").count() == 1
    # The timeline: the call that was accepted (202), then its wait, running to now.
    accepted = page.locator("svg#timeline rect.bar.action.accepted")
    assert await accepted.count() == 1
    assert "202" in (await accepted.locator("title").text_content() or "")
    wait = page.locator("svg#timeline rect.bar.callback-wait.waiting")
    assert await wait.count() == 1
    assert "waiting for its callback" in (await wait.locator("title").text_content() or "")
    would = await page.locator("#would-compensate").text_content() or ""
    assert re.search(r"charge\s*→\s*reserve", would), would  # its outcome is unknown
    await dash.shot("saga-callback-waiting")

    token = participant.to("/charge")[0].headers["x-saga-callback-url"].rsplit("/", 1)[1]
    reported = await orchestrator.post(
        f"/v1/callbacks/{token}", json={"status": "succeeded", "response": {"charge_id": "c1"}}
    )
    assert reported.status_code == 200, reported.text
    assert (await wait_terminal(orchestrator, saga_id))["status"] == "completed"
    await dash.goto(f"/admin/sagas/{saga_id}")
    assert (await page.locator("#saga-status").text_content() or "").strip() == "completed"
    assert await page.locator("#waiting").count() == 0
    assert await page.locator("table#steps tr.waiting-callback").count() == 0
    done = page.locator("svg#timeline rect.bar.callback-wait.succeeded")
    assert await done.count() == 1
    assert "waited for its callback, then succeeded" in (
        await done.locator("title").text_content() or ""
    )
    events = page.locator("table#events")
    assert await events.locator("tr", has_text="callback_reported").count() == 1
    await dash.shot("saga-callback-reported")
    await dash.goto("/admin/sagas")
    assert await dash.page.locator("table#sagas .waiting-callback").count() == 0


async def _retry_scheduled(client: httpx.AsyncClient, saga_id: str) -> bool:
    r = await client.get(f"/v1/sagas/{saga_id}/events")
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    return any(e["type"] == "attempt_finished" and e["outcome"] == "retryable" for e in items)


async def test_retry_a_dead_letter_with_a_click(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    saga = await with_open_dead_letter(orchestrator, participant)
    (letter,) = await open_dead_letters(orchestrator)
    assert (letter["saga_id"], letter["step"]) == (saga["id"], "receipt")
    participant.always("/receipt", Reply(200, {"id": "receipt-1"}))  # the mail server is back

    await dash.login()
    await dash.page.get_by_role("link", name="Dead letters", exact=True).click()
    await dash.page.wait_for_url(re.compile(r".*/admin/dead-letters\?status=open$"))
    row = dash.page.locator(f"table#dead-letters tr#dl-{letter['id']}")
    assert (await row.locator(".dl-status").text_content() or "").strip() == "open"
    assert "bad address" in (await row.text_content() or "")
    await dash.shot("dead-letters")

    async with dash.page.expect_response(lambda r: r.request.method == "POST") as answer:
        await row.locator("button.retry").click()
    response = await answer.value
    assert response.status == 303, f"{response.status}: {(await response.text())[:300]}"
    await dash.page.wait_for_url(dash.base + "/admin/dead-letters")
    row = dash.page.locator(f"table#dead-letters tr#dl-{letter['id']}")
    assert (await row.locator(".dl-status").text_content() or "").strip() == "retried"
    assert await row.locator("button.retry").count() == 0
    assert await row.locator("button.discard").count() == 0

    # The step runs again and succeeds; the saga stays completed.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        current = (await orchestrator.get(f"/v1/sagas/{saga['id']}")).json()
        if current["steps"][2]["status"] == "succeeded":
            break
        assert loop.time() < deadline, f"receipt is still {current['steps'][2]['status']}"
        await asyncio.sleep(0.1)
    assert current["status"] == "completed"
    assert current["steps"][2]["response"] == {"id": "receipt-1"}
    assert await open_dead_letters(orchestrator) == []

    # The action is on the audit log.
    await dash.goto("/admin/audit")
    entry = dash.page.locator("table#audit tr", has_text="dead_letter.retry")
    assert await entry.count() == 1
    assert letter["id"] in (await entry.text_content() or "")


async def test_forms_without_the_sessions_csrf_token_are_refused(
    dash: Dash, browser: Browser, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    await with_open_dead_letter(orchestrator, participant)
    (letter,) = await open_dead_letters(orchestrator)
    discard = f"{dash.base}/admin/dead-letters/{letter['id']}/discard"

    await dash.login()
    await dash.goto("/admin/dead-letters?status=open")
    mine = await dash.page.locator(f"tr#dl-{letter['id']} input[name=csrf]").first.input_value()
    assert mine

    # Another operator's session has its own token, which is no good with this cookie.
    other = await new_dash(browser, dash.base)
    try:
        await other.login()
        await other.goto("/admin/dead-letters?status=open")
        theirs = await other.page.locator("input[name=csrf]").first.input_value()
    finally:
        await other.context.close()
    assert theirs and theirs != mine

    request = dash.context.request  # shares the browser context's cookies
    forms: list[dict[str, str | float | bool]] = [{"reason": "no token"}, {"csrf": ""}]
    for form in forms:
        r = await request.post(discard, form=form, max_redirects=0)
        assert r.status == 403, form
    for token in ("wrong", mine[:-1] + ("0" if mine[-1] != "0" else "1"), theirs):
        r = await request.post(discard, form={"csrf": token, "reason": "x"}, max_redirects=0)
        assert r.status == 403, token
        assert "CSRF" in await r.text()
    r = await request.post(
        f"{dash.base}/admin/dead-letters/{letter['id']}/retry", form={}, max_redirects=0
    )
    assert r.status == 403
    r = await request.post(f"{dash.base}/admin/logout", form={}, max_redirects=0)
    assert r.status == 403
    assert [d["id"] for d in await open_dead_letters(orchestrator)] == [letter["id"]]
    await dash.goto("/admin")
    assert dash.path() == "/admin"  # the refused logout did not end the session

    # The same request with the page's token goes through.
    r = await request.post(discard, form={"csrf": mine, "reason": "sent by hand"}, max_redirects=0)
    assert r.status == 303
    assert r.headers["location"] == "/admin/dead-letters"
    assert await open_dead_letters(orchestrator) == []
    api = await orchestrator.get(f"/v1/admin/dead-letters/{letter['id']}", headers=ADMIN)
    assert (api.json()["status"], api.json()["reason"]) == ("discarded", "sent by hand")

    # The discard is on the audit log, with who and why; the services page lists both.
    await dash.page.get_by_role("link", name="Audit log", exact=True).click()
    await dash.page.wait_for_url(dash.base + "/admin/audit")
    entry = dash.page.locator("table#audit tr", has_text="dead_letter.discard")
    assert await entry.count() == 1
    text = await entry.text_content() or ""
    assert letter["id"] in text
    assert "sent by hand" in text
    assert "tok_" in text  # the token's id, not the token
    assert ADMIN_TOKEN not in await dash.page.content()
    await dash.shot("audit")
    await dash.page.get_by_role("link", name="Services", exact=True).click()
    await dash.page.wait_for_url(dash.base + "/admin/services")
    for name in ("shop", "mail"):
        service_row = dash.page.locator("table#services tr").filter(
            has=dash.page.locator(f"td:text-is('{name}')")
        )
        assert await service_row.count() == 1, name
        assert participant.url in (await service_row.text_content() or "")
        assert "closed" in (await service_row.text_content() or "")
    await dash.shot("services")


async def test_a_non_ascii_csrf_token_is_refused_not_a_server_error(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    await with_open_dead_letter(orchestrator, participant)
    (letter,) = await open_dead_letters(orchestrator)
    await dash.login()
    r = await dash.context.request.post(
        f"{dash.base}/admin/dead-letters/{letter['id']}/discard",
        form={"csrf": "\u00e9t\u00e9", "reason": "x"},
        max_redirects=0,
    )
    assert r.status == 403, f"{r.status}: {(await r.text())[:300]}"
    assert [d["id"] for d in await open_dead_letters(orchestrator)] == [letter["id"]]


async def test_a_non_ascii_session_cookie_is_no_session_not_a_server_error(dash: Dash) -> None:
    # A cookie is whatever the client sends: a non-ASCII one must lead to the login page.
    await dash.goto("/admin/login")  # the server is up and answering
    async with httpx.AsyncClient(base_url=dash.base) as client:
        r = await client.get("/admin", headers={b"cookie": f"{COOKIE}=1.2.\xe9".encode("latin-1")})
    assert r.status_code == 303, f"{r.status_code}: {r.text[:300]}"
    assert r.headers["location"].partition("?")[0] == "/admin/login"


# --- business keys and labels -------------------------------------------------------------


async def test_search_sagas_by_business_key_and_labels(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    await setup_checkout(orchestrator, participant)
    made: dict[str, str] = {}
    for key, labels in (
        ("order-1", {"tenant": "acme", "channel": "web"}),
        ("order-2", {"tenant": "acme", "channel": "shop"}),
        ("order-3", {"tenant": "umbrella", "channel": "web"}),
    ):
        r = await orchestrator.post(
            "/v1/sagas",
            json={
                "definition": "checkout",
                "input": {"order": 1},
                "business_key": key,
                "labels": labels,
                "notify": {"url": f"{participant.url}/hooks"},
            },
        )
        assert r.status_code == 201, r.text
        made[key] = r.json()["id"]
    await run(orchestrator)  # one without key or labels
    await dash.login()

    async def shown() -> set[str]:
        rows = dash.page.locator("#sagas tr td.business-key")
        return {(await rows.nth(i).text_content() or "").strip() for i in range(await rows.count())}

    await dash.goto("/admin/sagas")
    assert await shown() == {"order-1", "order-2", "order-3", ""}
    await dash.page.fill("#business-key", "order-2")
    await dash.page.get_by_role("button", name="Filter").click()
    await dash.page.wait_for_url("**business_key=order-2**")
    assert await shown() == {"order-2"}

    await dash.page.fill("#business-key", "")
    await dash.page.locator("input.label-filter").last.fill("tenant:acme")
    await dash.page.get_by_role("button", name="Filter").click()
    await dash.page.wait_for_url("**label=tenant%3Aacme**")
    assert await shown() == {"order-1", "order-2"}
    # The filter stays in the form; another label narrows it down.
    assert await dash.page.locator("input.label-filter").first.input_value() == "tenant:acme"
    await dash.page.locator("input.label-filter").last.fill("channel:web")
    await dash.page.get_by_role("button", name="Filter").click()
    await dash.page.wait_for_url("**channel%3Aweb**")
    assert await shown() == {"order-1"}
    await dash.shot("sagas-by-label")

    await dash.page.locator(f"a[href='/admin/sagas/{made['order-1']}']").click()
    await dash.page.locator("#business-key").wait_for()
    assert (await dash.page.locator("#business-key").text_content() or "") == "order-1"
    labels = await dash.page.locator("#labels").text_content() or ""
    assert "channel:web" in labels and "tenant:acme" in labels, labels
    note = await dash.page.locator("#notification").text_content() or ""
    assert "Notification:" in note and ("delivered" in note or "pending" in note), note
    await dash.page.locator("#labels a", has_text="tenant:acme").click()
    await dash.page.wait_for_url("**/admin/sagas?label=**")
    assert await shown() == {"order-1", "order-2"}

    bad = await dash.goto("/admin/sagas?label=no-colon")
    assert bad == 422
    assert "key:value" in (await dash.page.text_content("body") or "")


async def test_the_failure_plan_page_shows_the_plan_and_the_checklist(
    dash: Dash, orchestrator: httpx.AsyncClient, participant: Participant
) -> None:
    """From a saga's page to its definition's failure plan: a table of steps by failure
    kind, coloured by what follows, the same as the API's plan, and the checklist."""
    await setup_checkout(orchestrator, participant)
    saga = await declined(orchestrator, participant)
    r = await orchestrator.get("/v1/definitions/checkout/versions/1/plan")
    assert r.status_code == 200, r.text
    api_plan = r.json()

    await dash.login()
    await dash.goto(f"/admin/sagas/{saga['id']}")
    page = dash.page
    await page.locator("table#steps tr", has_text="charge").locator("a.if-failed").click()
    await page.wait_for_url(f"{dash.base}/admin/definitions/checkout/versions/1#step-charge")
    assert "Failure plan of checkout v1" in (await page.locator("h1").text_content() or "")

    rows = page.locator("table#plan tr[id^='step-']")
    assert await rows.count() == 3
    for step in api_plan["steps"]:
        row = page.locator(f"tr#step-{step['name']}")
        for kind, failure in step["failures"].items():
            cell = row.locator(f"td[data-kind='{kind}']")
            if failure is None:
                assert (await cell.text_content() or "").strip() == "cannot happen"
                continue
            assert await cell.get_attribute("data-then") == failure["then"], (step, kind)
            assert f"then-{failure['then']}" in (await cell.get_attribute("class") or "")
    charge_4xx = page.locator("tr#step-charge td[data-kind='http_4xx']")
    assert "undo: reserve" in (await charge_4xx.text_content() or "")
    charge_5xx = page.locator("tr#step-charge td[data-kind='http_5xx']")
    assert "undo: charge? → reserve" in (await charge_5xx.text_content() or "")
    receipt = page.locator("tr#step-receipt td.then-continue")
    assert await receipt.count() == 4  # 4xx, 5xx, timeout, connection: it goes on
    # No deadline: an open circuit is waited out, and the deadline cannot pass.
    assert await page.locator("td.then-wait[data-kind='circuit_open']").count() == 3
    colours = await charge_4xx.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colours != await receipt.first.evaluate("e => getComputedStyle(e).backgroundColor")

    checklist = page.locator("table#checklist")
    assert await checklist.locator("tr").count() == 1 + len(api_plan["checklist"])
    faults = checklist.locator("tr.fault")
    assert await faults.count() == sum(not f["ok"] for f in api_plan["checklist"]) > 0
    assert "jitter" in (await faults.first.text_content() or "")
    await dash.shot("plan")

    await dash.goto("/admin/definitions")
    await page.locator("table#definitions a", has_text="failure plan").click()
    await page.wait_for_url(f"{dash.base}/admin/definitions/checkout")
    assert await page.locator("table#plan tr[id^='step-']").count() == 3
    assert await dash.goto("/admin/definitions/nothing") == 404
    assert await dash.goto("/admin/definitions/checkout/versions/9") == 404
