"""Response documents of the API (request documents live in app.core.definition)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from app.core import patterns
from app.core.checklist import Finding, Review, Rule
from app.core.definition import CircuitBreakerConfig, Document, Name, NotifySpec, StepSpec
from app.core.labels import BusinessKey, Labels
from app.core.plan import Failure, FailureKind, Then
from app.core.states import (
    CircuitState,
    Direction,
    ErrorKind,
    NotificationStatus,
    SagaStatus,
    StepStatus,
)
from app.core.views import DefinitionRecord, SagaSummary, SagaView, ServiceRecord

REDACTED = "[redacted]"
T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass `next_cursor` back as `cursor` for the next (null: the end)."""

    items: list[T]
    next_cursor: Annotated[
        Annotated[str, Field(json_schema_extra={"pattern": patterns.CURSOR})] | None,
        Field(
            description="Opaque: pass it back unchanged as `cursor` for the next page; "
            "null on the last page.",
            examples=["InBheW1lbnRzIg"],
        ),
    ]


class SagaError(BaseModel):
    """Why a saga compensated or failed: the step (null when the saga as a whole was
    cancelled), the kind of failure and a message."""

    model_config = ConfigDict(extra="allow", title="SagaError")

    step: str | None = Field(examples=["create_order"])
    kind: ErrorKind
    message: str = Field(examples=["400 Bad Request"])


class StepError(BaseModel):
    """A step's last failed attempt: its kind (null when the call answered a status that
    is not retried), message, HTTP status, attempt number and direction."""

    model_config = ConfigDict(extra="allow", title="StepError")

    kind: ErrorKind | None
    message: str = Field(examples=["503 Service Unavailable"])
    status_code: int | None = Field(examples=[503])
    attempt: int = Field(ge=1, examples=[1])
    direction: Direction


class ProblemError(BaseModel):
    """One thing to fix: where (`loc`, e.g. `["body", "steps", 0, "name"]`), what, and a kind."""

    loc: list[str | int]
    msg: str
    type: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: the body of every 4xx and 5xx answer."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(examples=["urn:saga-orchestrator:problem:validation"])
    title: str = Field(examples=["Unprocessable content"])
    status: int = Field(ge=400, le=599, examples=[422])
    detail: str = Field(examples=["the request has invalid fields: see errors"])
    errors: list[ProblemError]


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready"]
    schema_revision: str | None = Field(alias="schema")


class ServiceOut(BaseModel):
    name: str
    base_url: str
    timeout_seconds: float
    max_concurrency: int
    circuit_breaker: CircuitBreakerConfig
    headers: dict[str, str] = Field(description="Header names; values are never echoed back.")
    circuit_state: CircuitState
    consecutive_failures: int
    opened_at: datetime | None
    in_flight: int
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, record: ServiceRecord) -> ServiceOut:
        spec = record.spec
        return cls(
            name=record.name,
            base_url=spec.base_url,
            timeout_seconds=spec.timeout_seconds,
            max_concurrency=spec.max_concurrency,
            circuit_breaker=spec.circuit_breaker,
            headers={k: REDACTED for k in spec.headers},
            circuit_state=record.circuit_state,
            consecutive_failures=record.consecutive_failures,
            opened_at=record.opened_at,
            in_flight=record.in_flight,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )


class DefinitionOut(BaseModel):
    name: str
    version: int
    content_hash: str
    description: str
    timeout_seconds: float | None
    steps: list[StepSpec]
    exclusive: bool = False
    created_at: datetime

    @classmethod
    def of(cls, record: DefinitionRecord) -> DefinitionOut:
        return cls(
            name=record.name,
            version=record.version,
            content_hash=record.content_hash,
            description=record.spec.description,
            timeout_seconds=record.spec.timeout_seconds,
            steps=record.spec.steps,
            exclusive=record.spec.exclusive,
            created_at=record.created_at,
        )


class FindingOut(BaseModel):
    """One finding of the resilience checklist."""

    rule: Rule
    ok: bool
    step: str | None = Field(description="The step at fault; null: the whole definition.")
    message: str = Field(description="What was found, and what to change.")

    @classmethod
    def of(cls, finding: Finding) -> FindingOut:
        return cls(rule=finding.rule, ok=finding.ok, step=finding.step, message=finding.message)


class RegisteredDefinitionOut(DefinitionOut):
    """A definition as registered, with the checklist findings that are not ok."""

    warnings: list[FindingOut] = Field(
        description="The failure plan's checklist findings that are not ok. They never "
        "block registration; `GET /v1/definitions/{name}/plan` shows the whole checklist."
    )


class FailureOut(BaseModel):
    """What one way of failing, on every attempt, leads to."""

    attempts: int = Field(description="Attempts the step makes (0: the call is never made).")
    retry_window_seconds: tuple[float, float] = Field(
        description="[lower, upper]: seconds after the first attempt ends in which the last "
        "one can start: the sums of the retry delays' bounds (jitter and "
        "max_interval_seconds included; attempt durations and Retry-After aside)."
    )
    then: Then = Field(
        description="compensate, continue (non-critical), fallback, dead_letter (past the "
        "pivot) or wait (circuit open, no deadline to end the wait)."
    )
    compensates: list[str] = Field(
        description="The steps compensated, in the order their compensations run; a "
        "trailing `?`: that step's own outcome is unknown. Steps without a compensation "
        "are left out."
    )
    final_status: SagaStatus = Field(
        description="The saga's status at the end if every compensation succeeds "
        "(`running`: it waits)."
    )
    error_kind: ErrorKind | None = Field(
        description="The error the saga records (null when it goes on without one)."
    )
    note: str | None = Field(description="When jitter or the deadline make the outcome vary.")

    @classmethod
    def of(cls, failure: Failure | None) -> FailureOut | None:
        if failure is None:
            return None
        return cls(
            attempts=failure.attempts,
            retry_window_seconds=failure.retry_window_seconds,
            then=failure.then,
            compensates=list(failure.compensates),
            final_status=failure.final_status,
            error_kind=failure.error_kind,
            note=failure.note,
        )


class FailuresOut(BaseModel):
    """One entry per failure kind; null where that kind cannot happen (every kind of a
    step the saga never reaches, when its deadline passes at once)."""

    http_4xx: FailureOut | None = Field(description="A status not in retry_on_status.")
    http_5xx: FailureOut | None = Field(description="A retried status, every attempt failing.")
    timeout: FailureOut | None = Field(description="No answer within the attempt's timeout.")
    connection: FailureOut | None = Field(description="The connection is refused (nothing sent).")
    circuit_open: FailureOut | None = Field(
        description="The service's circuit stays open (null: an absolute URL has no breaker)."
    )
    deadline: FailureOut | None = Field(
        description="The saga's deadline passes during the step (null: no timeout_seconds)."
    )


class StepPlanOut(BaseModel):
    name: str
    failures: FailuresOut


class PlanOut(BaseModel):
    """What happens when each step fails, in each way, and the resilience checklist."""

    definition: str
    version: int
    checklist: list[FindingOut]
    steps: list[StepPlanOut]

    @classmethod
    def of(cls, name: str, version: int, review: Review) -> PlanOut:
        steps = [
            StepPlanOut(
                name=step.name,
                failures=FailuresOut.model_validate(
                    {kind.value: FailureOut.of(step.failures[kind]) for kind in FailureKind}
                ),
            )
            for step in review.plan
        ]
        return cls(
            definition=name,
            version=version,
            checklist=[FindingOut.of(f) for f in review.findings],
            steps=steps,
        )


class SagaStart(Document):
    """`POST /v1/sagas` body."""

    definition: Name = Field(
        description="A registered definition (an unknown one is a `422`, `unknown-definition`)."
    )
    version: Annotated[int, Field(ge=1, le=2_000_000_000)] | None = Field(
        default=None,
        description="The definition's version to run; absent or null: the latest.",
    )
    input: Any = Field(
        default_factory=dict,
        description="Any JSON value, what `${input…}` references read; absent: `{}`. "
        "null is a value of its own (the saga's input is null), so it is other input "
        "than `{}` for an Idempotency-Key.",
    )
    business_key: BusinessKey | None = None
    labels: Labels = Field(default_factory=dict)
    notify: NotifySpec | None = Field(
        default=None,
        description="Where to POST the saga's view when it becomes terminal (replaces the "
        "definition's `notify`). An unknown service is a `422` (`invalid-notify`), a host "
        "SAGA_ALLOWED_HOSTS refuses a `422` (`host-not-allowed`).",
    )


class StepOut(BaseModel):
    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    status_code: int | None
    response: Any
    last_error: StepError | None
    started_at: datetime | None
    finished_at: datetime | None
    callback_due_at: datetime | None = Field(
        default=None,
        description="[1.1] A `waiting` callback step: when its attempt's wait ends without "
        "a report (a timeout, retried with a new callback URL); null otherwise.",
    )


class NotificationOut(BaseModel):
    """The saga's completion notification: `pending` (also while the saga runs, and
    while deliveries are retried), `delivered` (a 2xx came back) or `failed` (its
    attempts are exhausted: a dead letter with direction `notify`), and the attempts made
    for the saga's latest terminal status."""

    model_config = ConfigDict(title="Notification")

    status: NotificationStatus
    attempts: int = Field(ge=0, examples=[1])


class SagaOut(BaseModel):
    id: uuid.UUID
    definition: str
    definition_version: int
    status: SagaStatus
    input: Any
    idempotency_key: str | None
    business_key: str | None
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deadline_at: datetime | None
    cancel_requested: bool
    error: SagaError | None
    notification: NotificationOut | None = Field(
        description="The completion notification; null when the saga has no `notify` target."
    )
    steps: list[StepOut]

    @classmethod
    def of(cls, view: SagaView) -> SagaOut:
        return cls(
            id=view.id,
            definition=view.definition,
            definition_version=view.definition_version,
            status=view.status,
            input=view.input,
            idempotency_key=view.idempotency_key,
            business_key=view.business_key,
            labels=view.labels,
            created_at=view.created_at,
            updated_at=view.updated_at,
            finished_at=view.finished_at,
            deadline_at=view.deadline_at,
            cancel_requested=view.cancel_requested,
            error=view.error,
            notification=(
                NotificationOut(
                    status=view.notification.status, attempts=view.notification.attempts
                )
                if view.notification
                else None
            ),
            steps=[StepOut(**vars_of(s)) for s in view.steps],
        )


class StepSummaryOut(BaseModel):
    """A step as a list shows it: its response is in `GET /v1/sagas/{id}`."""

    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    status_code: int | None
    last_error: StepError | None
    started_at: datetime | None
    finished_at: datetime | None


class SagaSummaryOut(BaseModel):
    """A saga as a list shows it: everything but its `input` and its steps' responses,
    which can be large; `GET /v1/sagas/{id}` has them."""

    id: uuid.UUID
    definition: str
    definition_version: int
    status: SagaStatus
    idempotency_key: str | None
    business_key: str | None
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    deadline_at: datetime | None
    cancel_requested: bool
    error: SagaError | None
    steps: list[StepSummaryOut]

    @classmethod
    def of(cls, summary: SagaSummary) -> SagaSummaryOut:
        fields = vars_of(summary)
        fields["steps"] = [StepSummaryOut(**vars_of(s)) for s in summary.steps]
        return cls(**fields)


class EventOut(BaseModel):
    id: int
    at: datetime
    type: str
    step: str | None
    direction: str | None
    attempt: int | None
    outcome: str | None
    status_code: int | None
    error_kind: str | None
    message: str | None
    duration_ms: float | None
    worker: str | None


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


class DeadLetterOut(BaseModel):
    id: uuid.UUID
    saga_id: uuid.UUID
    definition: str
    step: str | None = Field(
        description="The step whose action or compensation is parked; null for a "
        "notification's dead letter (direction `notify`)."
    )
    direction: str
    service: str | None
    attempts: int
    last_error: dict[str, Any] | None
    request: dict[str, Any] | None
    status: str
    reason: str | None
    created_at: datetime
    resolved_at: datetime | None
    resolved_by: str | None

    @classmethod
    def of(cls, view: Any) -> DeadLetterOut:
        fields = vars_of(view)
        fields.pop("step_idx")
        return cls(**fields)


class CallbackAnswer(BaseModel):
    """A report was taken: the saga and step it completes, and the reported status."""

    saga_id: uuid.UUID
    step: str = Field(examples=["charge"])
    status: Literal["succeeded", "failed"]


class DiscardRequest(Document):
    reason: str = Field(min_length=1, max_length=1000, examples=["refunded by hand"])


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]
