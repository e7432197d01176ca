"""The resilience checklist, applied to a definition: one pure function per rule.

Each rule gives its findings: one `ok: false` finding per step (or per definition) it
finds at fault, with a message that says what to change, or a single `ok: true` finding
that says what was checked. The rules that ask what a failure leads to read the failure
plan (`app.core.plan`), so they judge by what the engine would do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from app.core.definition import DefinitionSpec, RetryPolicy, ServiceSpec, StepSpec
from app.core.plan import FailureKind, StepPlan, Then, failure_plan
from app.core.requests import attempt_timeout
from app.core.states import ErrorKind

# Above these, a retry policy is not "controlled": so many attempts hide an outage and
# hold the saga for long; so long a cap lets the delays grow past any useful wait.
MAX_ACTION_ATTEMPTS = 20
MAX_INTERVAL_SECONDS = 600.0
# The kinds a step's own policy retries (the deadline and an open circuit are not).
RETRIED_KINDS = (FailureKind.HTTP_5XX, FailureKind.TIMEOUT, FailureKind.CONNECTION)


class Rule(StrEnum):
    TIMEOUTS_DEFINED = "timeouts_defined"
    RETRIES_CONTROLLED = "retries_controlled"
    COMPENSATION_MISSING = "compensation_missing"
    ISOLATION = "isolation"
    FALLBACK_OR_NONCRITICAL = "fallback_or_noncritical"
    DEADLINE_REACHABLE = "deadline_reachable"


@dataclass(frozen=True, slots=True)
class Finding:
    rule: Rule
    ok: bool
    step: str | None
    message: str


@dataclass(frozen=True, slots=True)
class Review:
    """What the definition looks like to the checklist: the plan and the findings."""

    plan: tuple[StepPlan, ...]
    findings: tuple[Finding, ...]

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.ok)


Services = Mapping[str, ServiceSpec] | None  # None: no service is known (the CLI alone)


def _seconds(value: float) -> str:
    return f"{value:g} s"


def timeouts_defined(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]
) -> list[Finding]:
    """Every step's timeout, times its attempts, fits the saga's deadline."""
    deadline = spec.timeout_seconds
    if deadline is None:
        return []
    found = []
    for step in spec.steps:
        timeout = attempt_timeout(step.timeout_seconds, _service(step.action.service, services))
        if step.callback is not None:  # an attempt may wait this long for its report
            timeout = max(timeout, step.callback.timeout_seconds)
        total = timeout * step.retry.max_attempts
        if total > deadline:
            found.append(
                Finding(
                    Rule.TIMEOUTS_DEFINED,
                    False,
                    step.name,
                    f"{step.retry.max_attempts} attempts of {_seconds(timeout)} each take up to "
                    f"{_seconds(total)}, more than the saga's timeout_seconds "
                    f"({_seconds(deadline)}): lower this step's timeout_seconds or "
                    "retry.max_attempts (or its callback.timeout_seconds), or raise the "
                    "saga's timeout_seconds",
                )
            )
    return found


def _policy_problems(policy: RetryPolicy, field: str, max_attempts: int | None) -> list[str]:
    problems = []
    if max_attempts is not None and policy.max_attempts > max_attempts:
        problems.append(
            f"{field}.max_attempts is {policy.max_attempts}: use at most {max_attempts} and "
            "let the circuit breaker and dead letters handle longer outages"
        )
    if policy.max_attempts > 1 and not policy.jitter:
        problems.append(
            f"{field}.jitter is off: sagas that fail together retry together; set it to true"
        )
    if policy.max_attempts > 1 and policy.max_interval_seconds > MAX_INTERVAL_SECONDS:
        problems.append(
            f"{field}.max_interval_seconds is {policy.max_interval_seconds:g}: cap the delays "
            f"at {MAX_INTERVAL_SECONDS:g} s or less"
        )
    return problems


def retries_controlled(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]
) -> list[Finding]:
    """Bounded attempts, jitter on, delays capped by max_interval_seconds."""
    found = []
    for step in spec.steps:
        problems = _policy_problems(step.retry, "retry", MAX_ACTION_ATTEMPTS)
        if step.compensation is not None:
            problems += _policy_problems(step.compensation_retry, "compensation_retry", None)
        if problems:
            found.append(Finding(Rule.RETRIES_CONTROLLED, False, step.name, "; ".join(problems)))
    return found


def _unwinding_kinds(step: StepPlan) -> list[str]:
    return [
        k.value for k, f in step.failures.items() if f is not None and f.then is Then.COMPENSATE
    ]


def compensation_missing(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]
) -> list[Finding]:
    """A critical step before the pivot, or before a later step whose failure unwinds
    the saga, with no compensation: it would stay done while the rest is undone."""
    pivot = next((i for i, s in enumerate(spec.steps) if s.pivot), None)
    found = []
    for index, step in enumerate(spec.steps):
        if step.compensation is not None or not step.critical:
            continue
        later = [(p.name, kinds) for p in plan[index + 1 :] if (kinds := _unwinding_kinds(p))]
        if pivot is not None and index < pivot:
            why = f"it comes before the pivot '{spec.steps[pivot].name}'"
        elif later:
            name, kinds = later[0]
            why = f"a failure of '{name}' ({', '.join(kinds)}) unwinds the saga after it"
        else:
            continue
        found.append(
            Finding(
                Rule.COMPENSATION_MISSING,
                False,
                step.name,
                f"no compensation, yet {why}: its action would stay done while the saga is "
                "compensated; add a compensation, make the step critical: false, or move it "
                "after the steps that can fail (or after the pivot)",
            )
        )
    return found


def _calls(step: StepSpec) -> list[tuple[str, str | None, str | None]]:
    calls = [("action", step.action.service, step.action.url)]
    if step.compensation is not None:
        calls.append(("compensation", step.compensation.service, step.compensation.url))
    return calls


def isolation(spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]) -> list[Finding]:
    """Every call goes through a service, whose circuit breaker and bulkhead guard it."""
    found = []
    for step in spec.steps:
        problems = []
        unknown: list[str] = []
        for field, service, url in _calls(step):
            if url is not None:
                problems.append(
                    f"its {field} calls the absolute URL {url!r}, which no circuit breaker or "
                    "bulkhead guards: register the host as a service and call it by "
                    "service and path"
                )
            elif service and service not in unknown and service not in (services or {}):
                unknown.append(service)
        for service in unknown:
            problems.append(
                f"it calls service '{service}', which is not known here, so its circuit "
                f"breaker cannot be checked: register it (PUT /v1/services/{service}), or "
                "give its document with --services"
            )
        if problems:
            found.append(Finding(Rule.ISOLATION, False, step.name, "; ".join(problems)))
    return found


def fallback_or_noncritical(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]
) -> list[Finding]:
    """A critical step after the pivot with no fallback ends in a dead letter."""
    found = []
    for step, step_plan in zip(spec.steps, plan, strict=True):
        kinds = [
            k.value
            for k, f in step_plan.failures.items()
            if f is not None and f.then is Then.DEAD_LETTER
        ]
        if kinds:
            found.append(
                Finding(
                    Rule.FALLBACK_OR_NONCRITICAL,
                    False,
                    step.name,
                    f"critical, after the pivot and without a fallback: a final failure "
                    f"({', '.join(kinds)}) parks the saga failed in a dead letter for an "
                    "operator; add a fallback, make it critical: false, or be ready to retry "
                    "its dead letters",
                )
            )
    return found


def deadline_reachable(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan]
) -> list[Finding]:
    """The steps' worst-case retry windows fit the saga's deadline."""
    deadline = spec.timeout_seconds
    if deadline is None:
        return []
    found = []
    total = 0.0
    for step_plan in plan:
        if all(f is None for f in step_plan.failures.values()):
            found.append(
                Finding(
                    Rule.DEADLINE_REACHABLE,
                    False,
                    step_plan.name,
                    f"the saga's timeout_seconds ({_seconds(deadline)}) passes before this "
                    "step is even reached: raise timeout_seconds",
                )
            )
            continue
        retried = [(k, f) for k in RETRIED_KINDS if (f := step_plan.failures[k]) is not None]
        cut = [k.value for k, f in retried if f.error_kind is ErrorKind.DEADLINE]
        total += max((f.retry_window_seconds[1] for _, f in retried), default=0.0)
        if cut:
            found.append(
                Finding(
                    Rule.DEADLINE_REACHABLE,
                    False,
                    step_plan.name,
                    f"on {', '.join(cut)} the saga's timeout_seconds ({_seconds(deadline)}) "
                    "passes before this step's retries are spent, and the saga is compensated "
                    "as deadline: shorten its retries or raise the saga's timeout_seconds",
                )
            )
    if not found and total > deadline:
        found.append(
            Finding(
                Rule.DEADLINE_REACHABLE,
                False,
                None,
                f"the steps' worst-case retry windows add up to {_seconds(round(total, 3))}, "
                f"more than the saga's timeout_seconds ({_seconds(deadline)}): a saga in "
                "which several steps retry to the end is compensated as deadline; shorten "
                "the retries or raise timeout_seconds",
            )
        )
    return found


Check = Callable[[DefinitionSpec, Services, Sequence[StepPlan]], list[Finding]]
RULES: tuple[tuple[Rule, Check, str], ...] = (
    (
        Rule.TIMEOUTS_DEFINED,
        timeouts_defined,
        "every step's timeout times its attempts fits the saga's timeout_seconds "
        "(without one, each attempt still ends at its timeout)",
    ),
    (
        Rule.RETRIES_CONTROLLED,
        retries_controlled,
        f"every retry policy makes at most {MAX_ACTION_ATTEMPTS} attempts, is jittered and "
        f"caps its delays at {MAX_INTERVAL_SECONDS:g} s or less",
    ),
    (
        Rule.COMPENSATION_MISSING,
        compensation_missing,
        "every critical step that a later failure would unwind has a compensation",
    ),
    (
        Rule.ISOLATION,
        isolation,
        "every call goes through a registered service, with its circuit breaker and bulkhead",
    ),
    (
        Rule.FALLBACK_OR_NONCRITICAL,
        fallback_or_noncritical,
        "no failure parks the saga in a dead letter: every step past the pivot has a "
        "fallback or is non-critical",
    ),
    (
        Rule.DEADLINE_REACHABLE,
        deadline_reachable,
        "the steps' worst-case retry windows fit the saga's timeout_seconds (or it has none)",
    ),
)


def _service(name: str | None, services: Services) -> ServiceSpec | None:
    return services.get(name) if services and name else None


def checklist(
    spec: DefinitionSpec, services: Services, plan: Sequence[StepPlan] | None = None
) -> tuple[Finding, ...]:
    """Every rule's findings, in the rules' order: its faults, or one `ok` finding."""
    steps = plan if plan is not None else failure_plan(spec, services)
    findings: list[Finding] = []
    for rule, check, passed in RULES:
        findings.extend(check(spec, services, steps) or [Finding(rule, True, None, passed)])
    return tuple(findings)


def review(spec: DefinitionSpec, services: Services) -> Review:
    """The failure plan and the checklist of one definition."""
    plan = failure_plan(spec, services)
    return Review(plan, checklist(spec, services, plan))
