"""Dashboard pages under /admin. Thin: each route asks `Dashboard` or an admin store."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.api import examples
from app.api.auth import Tokens, require_admin
from app.api.context import AppContext, Ctx
from app.api.openapi import V1, answer, problems
from app.api.problems import Problem
from app.core.definition import NAME_PATTERN, is_name
from app.core.plan import FailureKind
from app.core.states import DeadLetterStatus, SagaStatus
from app.dashboard import auth
from app.dashboard.service import Dashboard

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
pages = APIRouter(prefix="/admin", include_in_schema=False)
api = APIRouter(prefix="/v1/admin")
REFRESH_SECONDS = 5
PLAN_KINDS = [kind.value for kind in FailureKind]


class LoginRequired(Exception):
    """Raised by `session` when there is no valid cookie: answered with a redirect."""


async def session(request: Request) -> str:
    """The session cookie, when its session is live in the database (not logged out,
    not expired); else a redirect to the login page."""
    ctx: AppContext = request.app.state.ctx
    cookie = request.cookies.get(auth.COOKIE)
    if not cookie or len(cookie) > 128 or not await ctx.ops.session_valid(auth.digest(cookie)):
        raise LoginRequired
    return cookie


Session = Annotated[str, Depends(session)]


def render(request: Request, name: str, cookie: str | None, **values: Any) -> HTMLResponse:
    ctx: AppContext = request.app.state.ctx
    csrf = auth.csrf_token(ctx.tokens.admin, cookie) if cookie else ""
    return templates.TemplateResponse(
        request, name, {"csrf": csrf, "refresh": REFRESH_SECONDS, **values}
    )


async def _form(request: Request) -> dict[str, str]:
    raw = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(raw).items()}


async def _checked_form(request: Request, cookie: str) -> dict[str, str] | None:
    ctx: AppContext = request.app.state.ctx
    form = await _form(request)
    if not auth.valid_csrf(ctx.tokens.admin, cookie, form.get("csrf")):
        return None
    return form


def _forbidden(request: Request) -> HTMLResponse:
    response = render(
        request,
        "message.html",
        None,
        title="Refused",
        message="The form's CSRF token is missing or wrong. Reload the page.",
    )
    response.status_code = 403
    return response


async def _then(request: Request, action: Awaitable[Any], page: str) -> Response:
    """Take an operator's action, then back to `page`; a refusal is shown, not raised."""
    try:
        await action
    except Problem as refused:
        response = render(request, "message.html", None, title="Not done", message=refused.detail)
        response.status_code = refused.status
        return response
    return RedirectResponse(page, status_code=303)


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard: never another site (open redirect)."""
    if target and target.startswith("/admin") and not target.startswith("//"):
        return target
    return "/admin"


@pages.get("/login")
async def login_page(
    request: Request, next: Annotated[str | None, Query(max_length=2048)] = None
) -> HTMLResponse:
    return render(request, "login.html", None, error=None, next=_safe_next(next))


@pages.post("/login")
async def login(request: Request, ctx: Ctx) -> Response:
    client = request.client.host if request.client else "unknown"
    wait = ctx.login_limiter.retry_after(client)
    target = _safe_next(None)
    if wait > 0:
        refused = render(
            request,
            "login.html",
            None,
            error=f"Too many failed logins from {client}; try again in {wait:.0f} s.",
            next=target,
        )
        refused.status_code = 429
        refused.headers["Retry-After"] = str(max(1, round(wait)))
        return refused
    form = await _form(request)
    token = form.get("token", "")
    target = _safe_next(form.get("next"))
    if not Tokens.matches(token, ctx.tokens.admin):
        ctx.login_limiter.failed(client)
        refused = render(
            request, "login.html", None, error="That is not the admin token.", next=target
        )
        refused.status_code = 401
        return refused
    cookie = auth.new_secret()
    await ctx.ops.open_session(
        auth.digest(cookie), Tokens.token_id(token), client, auth.SESSION_SECONDS
    )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        auth.COOKIE,
        cookie,
        max_age=auth.SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=ctx.settings.https,
        path="/admin",
    )
    return response


@pages.post("/logout")
async def logout(request: Request, ctx: Ctx, cookie: Session) -> Response:
    if await _checked_form(request, cookie) is None:
        return _forbidden(request)
    await ctx.ops.close_session(auth.digest(cookie))
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(
        auth.COOKIE, path="/admin", httponly=True, samesite="strict", secure=ctx.settings.https
    )
    return response


@pages.get("")
async def overview(request: Request, ctx: Ctx, cookie: Session) -> HTMLResponse:
    board = Dashboard(ctx)
    data = await board.overview()
    return render(request, "overview.html", cookie, data=data, chart=board.chart(data))


@pages.get("/sagas")
async def sagas(
    request: Request,
    ctx: Ctx,
    cookie: Session,
    status: Annotated[str | None, Query(max_length=32)] = None,
    definition: Annotated[str | None, Query(max_length=64)] = None,
    q: Annotated[str | None, Query(max_length=255)] = None,
    business_key: Annotated[str | None, Query(max_length=255)] = None,
    label: Annotated[list[str] | None, Query(max_length=16)] = None,
) -> HTMLResponse:
    # The form sends every field, empty ones included: empty means "any".
    labels = [text.strip() for text in label or [] if text.strip()]
    try:
        wanted = _saga_status(status)
        definition = _definition_name(definition)
        items = await Dashboard(ctx).sagas(
            wanted, definition, q.strip() if q else None, business_key or None, labels
        )
    except Problem as refused:
        response = render(
            request, "message.html", cookie, title="Bad filter", message=refused.detail
        )
        response.status_code = refused.status
        return response
    return render(
        request,
        "sagas.html",
        cookie,
        items=items,
        definition=definition,
        status=wanted,
        q=q or "",
        business_key=business_key or "",
        labels=labels,
        statuses=list(SagaStatus),
    )


def _saga_status(text: str | None) -> SagaStatus | None:
    if not text:
        return None
    try:
        return SagaStatus(text)
    except ValueError:
        statuses = ", ".join(s.value for s in SagaStatus)
        raise Problem(422, f"status must be one of {statuses}") from None


def _definition_name(text: str | None) -> str | None:
    if text and not re.match(NAME_PATTERN, text):
        raise Problem(422, f"definition must match {NAME_PATTERN}")
    return text or None


@pages.get("/sagas/{saga_id}")
async def saga_detail(request: Request, ctx: Ctx, cookie: Session, saga_id: uuid.UUID) -> Response:
    detail = await Dashboard(ctx).saga_detail(saga_id)
    if detail is None:
        response = render(
            request,
            "message.html",
            cookie,
            title="Not found",
            message=f"There is no saga {saga_id}.",
        )
        response.status_code = 404
        return response
    return render(request, "saga.html", cookie, **detail)


@pages.get("/definitions")
async def definitions(request: Request, ctx: Ctx, cookie: Session) -> HTMLResponse:
    items = await Dashboard(ctx).definitions()
    return render(request, "definitions.html", cookie, items=items)


@pages.get("/definitions/{name}")
async def definition_plan(request: Request, ctx: Ctx, cookie: Session, name: str) -> Response:
    return await _plan_page(request, ctx, cookie, name, None)


@pages.get("/definitions/{name}/versions/{version}")
async def definition_version_plan(
    request: Request,
    ctx: Ctx,
    cookie: Session,
    name: str,
    version: Annotated[int, PathParam(ge=1, le=2_000_000_000)],
) -> Response:
    return await _plan_page(request, ctx, cookie, name, version)


async def _plan_page(
    request: Request, ctx: AppContext, cookie: str, name: str, version: int | None
) -> Response:
    """What would happen if each step failed, in each way, and the checklist."""
    found = await Dashboard(ctx).plan(name, version) if is_name(name) else None
    if found is None:
        which = f"{name} v{version}" if version else name
        response = render(
            request, "message.html", cookie, title="Not found", message=f"No definition {which}."
        )
        response.status_code = 404
        return response
    return render(request, "plan.html", cookie, auto_refresh=False, kinds=PLAN_KINDS, **found)


@pages.get("/dead-letters")
async def dead_letters(
    request: Request, ctx: Ctx, cookie: Session, status: DeadLetterStatus | None = None
) -> HTMLResponse:
    items = await Dashboard(ctx).dead_letters(status)
    return render(request, "dead_letters.html", cookie, items=items, status=status)


@pages.post("/dead-letters/{dl_id}/retry")
async def retry_dead_letter(
    request: Request, ctx: Ctx, cookie: Session, dl_id: uuid.UUID
) -> Response:
    if await _checked_form(request, cookie) is None:
        return _forbidden(request)
    action = ctx.ops.retry_dead_letter(dl_id, Tokens.token_id(ctx.tokens.admin))
    return await _then(request, action, "/admin/dead-letters")


@pages.post("/dead-letters/{dl_id}/discard")
async def discard_dead_letter(
    request: Request, ctx: Ctx, cookie: Session, dl_id: uuid.UUID
) -> Response:
    form = await _checked_form(request, cookie)
    if form is None:
        return _forbidden(request)
    reason = (form.get("reason") or "").strip()[:1000] or "discarded from the dashboard"
    action = ctx.ops.discard_dead_letter(dl_id, Tokens.token_id(ctx.tokens.admin), reason)
    return await _then(request, action, "/admin/dead-letters")


@pages.get("/services")
async def services(request: Request, ctx: Ctx, cookie: Session) -> HTMLResponse:
    return render(request, "services.html", cookie, items=await Dashboard(ctx).services())


@pages.post("/services/{name}/reset")
async def reset_circuit(request: Request, ctx: Ctx, cookie: Session, name: str) -> Response:
    if await _checked_form(request, cookie) is None:
        return _forbidden(request)
    action = ctx.ops.reset_circuit(name, Tokens.token_id(ctx.tokens.admin))
    return await _then(request, action, "/admin/services")


@pages.get("/audit")
async def audit(request: Request, ctx: Ctx, cookie: Session) -> HTMLResponse:
    return render(request, "audit.html", cookie, items=await Dashboard(ctx).audit())


@api.get(
    "/dashboard",
    summary="The dashboard's figures as JSON",
    responses={
        **answer(200, "The figures", examples.DASHBOARD),
        **problems(*V1, 403),
    },
)
async def dashboard_json(ctx: Ctx, _actor: Annotated[str, Depends(require_admin)]) -> Any:
    """Sagas by status and definition, in flight, throughput and failure rate over the last
    hour in 5-minute buckets, dead letters open, executor lag, each service's circuit state
    and calls in flight, and the latest failed sagas."""
    return await Dashboard(ctx).overview()
