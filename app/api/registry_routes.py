"""Services and definitions: `PUT/GET /v1/services…`, `POST/GET /v1/definitions…`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response

from app.api.auth import require_api
from app.api.context import Ctx
from app.api.pagination import Cursor, Limit, bad_cursor, decode_cursor, encode_cursor
from app.api.problems import Problem
from app.api.schemas import DefinitionOut, Page, ServiceOut
from app.domain.definition import (
    NAME_PATTERN,
    DefinitionSpec,
    ServiceSpec,
    check_definition,
    host_allowed,
    is_name,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api)])
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="lowercase name")]
PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed request"},
    401: {"description": "Missing or wrong token"},
    404: {"description": "Not found"},
    413: {"description": "Body over 1 MiB"},
    422: {"description": "Invalid fields; `errors` says which"},
}


def _cursor_name(cursor: str | None) -> str | None:
    value = decode_cursor(cursor)
    if value is not None and not (isinstance(value, str) and is_name(value)):
        raise bad_cursor()
    return value


@router.put(
    "/services/{name}",
    response_model=ServiceOut,
    status_code=200,
    responses={201: {"model": ServiceOut, "description": "Registered"}, **PROBLEMS},
    summary="Register or replace a participant service",
)
async def put_service(
    name: NamePath, spec: ServiceSpec, ctx: Ctx, response: Response
) -> ServiceOut:
    if not host_allowed(spec.base_url, ctx.settings.allowed_host_patterns):
        raise Problem(
            422,
            f"base_url host is not allowed by SAGA_ALLOWED_HOSTS ({ctx.settings.allowed_hosts})",
            slug="host-not-allowed",
            errors=[
                {"loc": ["body", "base_url"], "msg": "host not allowed", "type": "value_error"}
            ],
        )
    record, created = await ctx.registry.put_service(name, spec)
    response.status_code = 201 if created else 200
    return ServiceOut.of(record)


@router.get("/services", response_model=Page, summary="List services", responses=PROBLEMS)
async def list_services(ctx: Ctx, limit: Limit = 50, cursor: Cursor = None) -> Page:
    records = await ctx.registry.list_services(limit, _cursor_name(cursor))
    next_cursor = encode_cursor(records[-1].name) if len(records) == limit else None
    return Page(items=[ServiceOut.of(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/services/{name}",
    response_model=ServiceOut,
    summary="One service with its live state",
    responses=PROBLEMS,
)
async def get_service(name: NamePath, ctx: Ctx) -> ServiceOut:
    record = await ctx.registry.get_service(name)
    if record is None:
        raise Problem(404, f"no service named '{name}'", slug="unknown-service")
    return ServiceOut.of(record)


@router.post(
    "/definitions",
    response_model=DefinitionOut,
    status_code=201,
    responses={200: {"model": DefinitionOut, "description": "Same as the latest"}, **PROBLEMS},
    summary="Register a definition (a new version when the content changed)",
)
async def post_definition(spec: DefinitionSpec, ctx: Ctx, response: Response) -> DefinitionOut:
    wanted = {
        s.service for st in spec.steps for s in (st.action, st.compensation) if s and s.service
    }
    known = await ctx.registry.service_names(wanted)
    violations = check_definition(spec, known, ctx.settings.allowed_host_patterns)
    if violations:
        raise Problem(
            422,
            "; ".join(v.msg for v in violations[:5]),
            slug="invalid-definition",
            errors=[
                {"loc": ["body", *v.loc], "msg": v.msg, "type": "value_error"} for v in violations
            ],
        )
    record, created = await ctx.registry.register_definition(spec)
    response.status_code = 201 if created else 200
    return DefinitionOut.of(record)


@router.get(
    "/definitions",
    response_model=Page,
    summary="Latest version of each definition",
    responses=PROBLEMS,
)
async def list_definitions(ctx: Ctx, limit: Limit = 50, cursor: Cursor = None) -> Page:
    records = await ctx.registry.list_definitions(limit, _cursor_name(cursor))
    next_cursor = encode_cursor(records[-1].name) if len(records) == limit else None
    return Page(items=[DefinitionOut.of(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/definitions/{name}",
    response_model=DefinitionOut,
    summary="Latest version",
    responses=PROBLEMS,
)
async def get_definition(name: NamePath, ctx: Ctx) -> DefinitionOut:
    record = await ctx.registry.get_definition(name)
    if record is None:
        raise Problem(404, f"no definition named '{name}'", slug="unknown-definition")
    return DefinitionOut.of(record)


@router.get(
    "/definitions/{name}/versions/{version}",
    response_model=DefinitionOut,
    summary="One version",
    responses=PROBLEMS,
)
async def get_definition_version(
    name: NamePath, version: Annotated[int, Path(ge=1, le=2_000_000_000)], ctx: Ctx
) -> DefinitionOut:
    record = await ctx.registry.get_definition(name, version)
    if record is None:
        raise Problem(404, f"definition '{name}' has no version {version}", slug="unknown-version")
    return DefinitionOut.of(record)
