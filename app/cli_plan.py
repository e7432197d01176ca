"""`saga-orchestrator plan FILE.json [--services FILE.json] [--strict] [--json]`: the
failure plan and checklist of a definition file, without a database.

Services are what a registry would know; without `--services` every service the
definition names is unknown: the plan takes the defaults (a 10 s timeout, a breaker of
5 failures and 30 s) and the `isolation` rule reports each such service as not known.
`--services` takes a JSON object of service documents by name (the bodies of
`PUT /v1/services/{name}`), or the answer of `GET /v1/services` as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.api.schemas import PlanOut
from app.core.checklist import Review, review
from app.core.definition import STORED, DefinitionSpec, ServiceSpec, check_definition
from app.core.hosts import HostPolicy

HELP = (
    "Print the failure plan and the resilience checklist of a definition file, without a "
    "database: for every step and way of failing, the attempts, the retry window, what "
    "follows, the compensations in order and the saga's final status. Exit status 1 with "
    "--strict when a rule is not ok, 2 when a file is not valid."
)
_SERVICE_FIELDS = ("base_url", "timeout_seconds", "max_concurrency", "circuit_breaker")


class BadInput(Exception):
    """A file that cannot be read as what it should be."""


def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(f"{path}: cannot read the {what} as JSON: {exc}") from None


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}" for e in exc.errors()
    )


def read_services(path: str) -> dict[str, ServiceSpec]:
    """Service documents by name, or a `GET /v1/services` page (live fields left out)."""
    data = _read_json(path, "services")
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data = {
            item.get("name"): {k: item[k] for k in _SERVICE_FIELDS if k in item}
            for item in data["items"]
            if isinstance(item, dict)
        }
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected an object of service documents by name")
    services = {}
    for name, doc in data.items():
        try:
            services[str(name)] = ServiceSpec.model_validate(doc, context=STORED)
        except ValidationError as exc:
            raise BadInput(f"{path}: service '{name}': {_errors(exc)}") from None
    return services


def read_definition(path: str, services: dict[str, ServiceSpec] | None) -> DefinitionSpec:
    """The definition, held to every registration rule that needs no database."""
    try:
        spec = DefinitionSpec.model_validate(_read_json(path, "definition"))
    except ValidationError as exc:
        raise BadInput(f"{path}: {_errors(exc)}") from None
    named = {c.service for s in spec.steps for c in (s.action, s.compensation) if c and c.service}
    known = set(services) if services is not None else {n for n in named if n}
    hosts = HostPolicy.parse(os.environ.get("SAGA_ALLOWED_HOSTS", "*"))
    problems = check_definition(spec, known, hosts)
    if problems:
        where = "; ".join(f"{'.'.join(str(p) for p in v.loc)}: {v.msg}" for v in problems)
        raise BadInput(f"{path}: {where}")
    return spec


def _seconds(value: float) -> str:
    return f"{value:g}"


def render(spec: DefinitionSpec, result: Review) -> str:
    """The plan and the checklist as text for a terminal."""
    deadline = f"deadline {spec.timeout_seconds:g} s" if spec.timeout_seconds else "no deadline"
    lines = [f"{spec.name}: {len(spec.steps)} steps, {deadline}", "", "Checklist"]
    for f in result.findings:
        mark = "ok    " if f.ok else "NOT OK"
        where = f"{f.step}: " if f.step else ""
        lines.append(f"  {mark}  {f.rule.value:<24} {where}{f.message}")
    lines += ["", "If a step fails (every attempt; every other call succeeds)"]
    for step in result.plan:
        lines.append(f"  {step.name}")
        for kind, failure in step.failures.items():
            if failure is None:
                lines.append(f"    {kind.value:<13} cannot happen")
                continue
            low, high = failure.retry_window_seconds
            tries = f"{failure.attempts} attempt{'' if failure.attempts == 1 else 's'}"
            window = f", last within {_seconds(low)}-{_seconds(high)} s" if high else ""
            text = f"    {kind.value:<13} {tries}{window}: {failure.then.value}"
            text += f" -> {failure.final_status.value}"
            if failure.compensates:
                text += f"; undo {', '.join(failure.compensates)}"
            if failure.note:
                text += f" ({failure.note})"
            lines.append(text)
    return "\n".join(lines)


def plan_command(definition: str, services_file: str | None, strict: bool, as_json: bool) -> int:
    """Print the plan; the exit status (0; 1: --strict and a rule not ok; 2: bad input)."""
    try:
        services = read_services(services_file) if services_file else None
        spec = read_definition(definition, services)
    except BadInput as exc:
        print(f"saga-orchestrator plan: {exc}", flush=True)
        return 2
    result = review(spec, services)
    if as_json:
        document = PlanOut.of(spec.name, 0, result).model_dump(mode="json")
        document["version"] = None  # a file, not a registered version
        print(json.dumps(document, indent=2))
    else:
        print(render(spec, result))
    return 1 if strict and result.warnings else 0
