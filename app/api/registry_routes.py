"""Services and definitions: `PUT/GET /v1/services…`, `POST/GET /v1/definitions…`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Response

from app.api import examples
from app.api.auth import require_api, require_registrar
from app.api.context import Ctx
from app.api.openapi import RETRY_INTERVALS, V1, answer, link, problems
from app.api.pagination import Cursor, Limit, bad_cursor, decode_cursor, encode_cursor
from app.api.schemas import (
    DefinitionOut,
    FindingOut,
    Page,
    PlanOut,
    RegisteredDefinitionOut,
    ServiceOut,
)
from app.core.definition import (
    NAME_PATTERN,
    DefinitionSpec,
    ServiceSpec,
    is_name,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api)])
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description="lowercase name")]
Registrar = Annotated[str, Depends(require_registrar)]
REGISTER = (*V1, 403)  # with SAGA_API_TOKEN set, registering needs the admin token
SERVICE_BODY = Body(
    openapi_examples={
        "payments": {"summary": "A payments service", "value": examples.SERVICE_SPEC},
        "minimal": {"summary": "Only the URL", "value": {"base_url": "http://127.0.0.1:9001"}},
    }
)
SERVICE_LINKS = {
    "GetService": link("GET", "/v1/services/{name}", "The service", name="$response.body#/name"),
    "ResetCircuit": link(
        "POST",
        "/v1/admin/services/{name}/circuit/reset",
        "Close its circuit",
        name="$response.body#/name",
    ),
}
DEFINITION_LINKS = {
    "GetDefinition": link(
        "GET", "/v1/definitions/{name}", "Its latest version", name="$response.body#/name"
    ),
    "GetDefinitionVersion": link(
        "GET",
        "/v1/definitions/{name}/versions/{version}",
        "This version",
        name="$response.body#/name",
        version="$response.body#/version",
    ),
}
DEFINITION_BODY = Body(
    openapi_examples={
        "checkout": {"summary": "Charge, then create the order", "value": examples.DEFINITION_SPEC}
    }
)


def _cursor_name(cursor: str | None) -> str | None:
    value = decode_cursor(cursor)
    if value is not None and not (isinstance(value, str) and is_name(value)):
        raise bad_cursor()
    return value


@router.put(
    "/services/{name}",
    tags=["services"],
    response_model=ServiceOut,
    status_code=200,
    responses={
        **answer(200, "Replaced: the service existed", examples.SERVICE_OUT, links=SERVICE_LINKS),
        **answer(201, "Registered", examples.SERVICE_OUT, model=ServiceOut, links=SERVICE_LINKS),
        **problems(
            *REGISTER,
            415,
            422,
            notes={
                404: "No such endpoint: the name has a `/` in it.",
                422: "Invalid fields, or `base_url`'s host is not allowed by SAGA_ALLOWED_HOSTS; "
                "`errors` says which.",
            },
            rules=["host-not-allowed"],
        ),
    },
    summary="Register or replace a participant service",
)
async def put_service(
    name: NamePath,
    spec: Annotated[ServiceSpec, SERVICE_BODY],
    ctx: Ctx,
    actor: Registrar,
    response: Response,
) -> ServiceOut:
    """Register the participant service `name`, or replace its settings (`200`).

    Steps reach it by name: its `base_url` and `headers` apply to every call, its
    `timeout_seconds` is the default per-attempt timeout, `max_concurrency` caps the
    calls in flight across all executors, and `circuit_breaker` tunes its breaker.
    Header values are secrets: they are never echoed back.
    """
    record, created = await ctx.catalog.put_service(name, spec, actor)
    response.status_code = 201 if created else 200
    return ServiceOut.of(record)


@router.get(
    "/services",
    tags=["services"],
    response_model=Page[ServiceOut],
    summary="List services",
    responses={
        **answer(200, "A page of services, by name", examples.page(examples.SERVICE_OUT)),
        **problems(*V1, 422, rules=["bad-cursor"]),
    },
)
async def list_services(ctx: Ctx, limit: Limit = 50, cursor: Cursor = None) -> Page[ServiceOut]:
    """The registered services in name order, with their live circuit state."""
    records = await ctx.catalog.services(limit, _cursor_name(cursor))
    next_cursor = encode_cursor(records[-1].name) if len(records) == limit else None
    return Page[ServiceOut](items=[ServiceOut.of(r) for r in records], next_cursor=next_cursor)


@router.get(
    "/services/{name}",
    tags=["services"],
    response_model=ServiceOut,
    summary="One service with its live state",
    responses={
        **answer(200, "The service", examples.SERVICE_OUT),
        **problems(*V1, 404, 422, notes={404: "No service with this name."}),
    },
)
async def get_service(name: NamePath, ctx: Ctx) -> ServiceOut:
    """One service's settings and live state: `circuit_state` (`closed`, `open`,
    `half_open`), `consecutive_failures`, `opened_at` and the calls `in_flight` now."""
    return ServiceOut.of(await ctx.catalog.service(name))


@router.post(
    "/definitions",
    tags=["definitions"],
    response_model=RegisteredDefinitionOut,
    status_code=201,
    responses={
        **answer(
            200,
            "Same content as the latest version: that version",
            examples.REGISTERED_OUT,
            model=RegisteredDefinitionOut,
            links=DEFINITION_LINKS,
        ),
        **answer(
            201, "Registered as a new version", examples.REGISTERED_OUT, links=DEFINITION_LINKS
        ),
        **problems(
            *REGISTER,
            415,
            422,
            notes={
                422: "Invalid fields, or a rule broken: an unknown service, a template "
                "reference to an unknown or later step, a step name used twice, more than one "
                "pivot, a URL host not allowed; `errors` says which."
            },
            rules=["invalid-definition"],
            examples={422: {"retry-intervals": RETRY_INTERVALS}},
        ),
    },
    summary="Register a definition (a new version when the content changed)",
)
async def post_definition(
    spec: Annotated[DefinitionSpec, DEFINITION_BODY],
    ctx: Ctx,
    response: Response,
    actor: Registrar,
) -> DefinitionOut:
    """Register a saga definition: named steps, each an `action` and an optional
    `compensation` HTTP call, with retry policies, timeouts and templates.

    The same name and content as the latest version answers `200` with that version
    (idempotent); new content answers `201` with `version` + 1. Running sagas keep the
    version they started with.

    `warnings` lists the checklist findings of its failure plan that are not ok (a step
    with no compensation that a later failure would unwind, retries without jitter, a
    deadline shorter than the retries, …); they never block registration.
    """
    record, created = await ctx.catalog.register_definition(spec, actor)
    response.status_code = 201 if created else 200
    review = await ctx.catalog.review(record.spec)
    return RegisteredDefinitionOut(
        **DefinitionOut.of(record).model_dump(),
        warnings=[FindingOut.of(f) for f in review.warnings],
    )


@router.get(
    "/definitions",
    tags=["definitions"],
    response_model=Page[DefinitionOut],
    summary="Latest version of each definition",
    responses={
        **answer(200, "A page of definitions, by name", examples.page(examples.DEFINITION_OUT)),
        **problems(*V1, 422, rules=["bad-cursor"]),
    },
)
async def list_definitions(
    ctx: Ctx, limit: Limit = 50, cursor: Cursor = None
) -> Page[DefinitionOut]:
    """The latest version of every definition, in name order."""
    records = await ctx.catalog.definitions(limit, _cursor_name(cursor))
    next_cursor = encode_cursor(records[-1].name) if len(records) == limit else None
    return Page[DefinitionOut](
        items=[DefinitionOut.of(r) for r in records], next_cursor=next_cursor
    )


@router.get(
    "/definitions/{name}",
    tags=["definitions"],
    response_model=DefinitionOut,
    summary="Latest version",
    responses={
        **answer(200, "The latest version", examples.DEFINITION_OUT),
        **problems(*V1, 404, 422, notes={404: "No definition with this name."}),
    },
)
async def get_definition(name: NamePath, ctx: Ctx) -> DefinitionOut:
    """The latest version of the definition `name`, with every default filled in."""
    return DefinitionOut.of(await ctx.catalog.definition(name))


@router.get(
    "/definitions/{name}/versions/{version}",
    tags=["definitions"],
    response_model=DefinitionOut,
    summary="One version",
    responses={
        **answer(200, "That version", examples.DEFINITION_OUT),
        **problems(*V1, 404, 422, notes={404: "No such definition, or not that version."}),
    },
)
async def get_definition_version(
    name: NamePath,
    version: Annotated[int, Path(ge=1, le=2_000_000_000, description="1, 2, …")],
    ctx: Ctx,
) -> DefinitionOut:
    """One version of a definition: what the sagas started on it run."""
    return DefinitionOut.of(await ctx.catalog.definition(name, version))


PLAN_DOC = """For every step and failure kind (`http_4xx`, `http_5xx`, `timeout`, `connection`,
`circuit_open`, `deadline`): how many attempts the step makes, the window in which its
last attempt can start, what follows (`then`), the compensations that run in order (a
trailing `?`: that step's outcome is unknown) and the saga's `final_status`; and the
resilience checklist. Worked out by the engine's own decisions on a simulated saga in
which that step fails that way on every attempt and every other call succeeds, with the
services as registered now."""
PLAN_LINKS = {
    "GetDefinitionVersion": link(
        "GET",
        "/v1/definitions/{name}/versions/{version}",
        "The version this plan is of",
        name="$response.body#/definition",
        version="$response.body#/version",
    )
}


@router.get(
    "/definitions/{name}/plan",
    tags=["definitions"],
    response_model=PlanOut,
    summary="Failure plan of the latest version: what happens when each step fails",
    description=PLAN_DOC,
    responses={
        **answer(200, "The plan and the checklist", examples.PLAN_OUT, links=PLAN_LINKS),
        **problems(*V1, 404, 422, notes={404: "No definition with this name."}),
    },
)
async def get_plan(name: NamePath, ctx: Ctx) -> PlanOut:
    record, review = await ctx.catalog.plan(name)
    return PlanOut.of(record.name, record.version, review)


@router.get(
    "/definitions/{name}/versions/{version}/plan",
    tags=["definitions"],
    response_model=PlanOut,
    summary="Failure plan of one version",
    description=PLAN_DOC,
    responses={
        **answer(200, "The plan and the checklist", examples.PLAN_OUT, links=PLAN_LINKS),
        **problems(*V1, 404, 422, notes={404: "No such definition, or not that version."}),
    },
)
async def get_version_plan(
    name: NamePath,
    version: Annotated[int, Path(ge=1, le=2_000_000_000, description="1, 2, …")],
    ctx: Ctx,
) -> PlanOut:
    record, review = await ctx.catalog.plan(name, version)
    return PlanOut.of(record.name, record.version, review)
