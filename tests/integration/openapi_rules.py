"""A schemathesis check for tests/integration/test_openapi_acceptance.py (SCHEMATHESIS_HOOKS).

`documented_refusals_only`: a schema-valid request may be refused with a status that
positive data should never meet (400, 422) only by a business rule the document names
for that operation: a named example of that answer (other than the generic
`validation` and `malformed-json` ones) with the problem `type` answered. A rule the
document states but JSON Schema cannot (a retry policy's `max_interval_seconds` may not
be below its `initial_interval_seconds`: it compares two fields) is answered as any
invalid field is, `validation`: it passes when every error of the answer is one of
that example's errors (same message and type).
"""

from __future__ import annotations

from typing import Any

import schemathesis

GENERIC = {"validation", "malformed-json"}  # the default example of a 422 / a 400
PROBLEM_JSON = "application/problem+json"
VALIDATION = "urn:saga-orchestrator:problem:validation"
# What positive data may meet whatever the rules (schemathesis' own default).
ALWAYS = {401, 403, 404, 409, 429}


def documented_rules(operation: dict[str, Any], status: int) -> list[dict[str, Any]]:
    """The problems the operation's answer with this status names as business rules."""
    response = operation.get("responses", {}).get(str(status), {})
    named = response.get("content", {}).get(PROBLEM_JSON, {}).get("examples", {})
    return [example["value"] for name, example in named.items() if name not in GENERIC]


def _errors(problem: dict[str, Any]) -> set[tuple[str, str]]:
    return {(str(e.get("msg")), str(e.get("type"))) for e in problem.get("errors", [])}


def is_documented(problem: Any, rules: list[dict[str, Any]]) -> bool:
    if not isinstance(problem, dict):
        return False
    kind = problem.get("type")
    if kind != VALIDATION:
        return any(rule["type"] == kind for rule in rules)
    stated = set().union(*(_errors(r) for r in rules if r["type"] == VALIDATION))
    return bool(_errors(problem)) and _errors(problem) <= stated


@schemathesis.check
def documented_refusals_only(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ALWAYS:
        return None
    try:
        problem = response.json()
    except ValueError:
        problem = None
    rules = documented_rules(case.operation.definition.raw, status)
    if not is_documented(problem, rules):
        raise AssertionError(
            f"{case.operation.label}: a schema-valid request was refused with {status} "
            f"{response.text[:300]}; the document names only {[r['type'] for r in rules]} "
            "as rules of this answer"
        )
    return None
