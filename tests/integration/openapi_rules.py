"""Schemathesis hooks for tests/integration/test_openapi_acceptance.py (SCHEMATHESIS_HOOKS).

`documented_refusals_only`: a schema-valid request may be refused with a status that
positive data should never meet (400, 422) only by a business rule the document names
for that operation: a named example of that answer whose problem `type` is the one
answered, other than the generic `validation` and `malformed-json` (those would mean
the schema let through something the server refuses).

`filter_body`: the one rule of a single document that JSON Schema cannot state, a retry
policy's `max_interval_seconds` not below its `initial_interval_seconds` (it compares two
fields; the document says it in `RetryPolicy`'s description and a named example). Bodies
that break it are not generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

GENERIC = {"validation", "malformed-json"}
PROBLEM_JSON = "application/problem+json"
PREFIX = "urn:saga-orchestrator:problem:"
# What positive data may meet whatever the rules (schemathesis' own default).
ALWAYS = {401, 403, 404, 409, 429}


def documented_types(operation: dict[str, Any], status: int) -> set[str]:
    """The problem types the operation's answer with this status names as rules."""
    response = operation.get("responses", {}).get(str(status), {})
    media = response.get("content", {}).get(PROBLEM_JSON, {})
    found = set()
    for example in media.get("examples", {}).values():
        kind = str(example.get("value", {}).get("type", ""))
        if kind.startswith(PREFIX) and kind.removeprefix(PREFIX) not in GENERIC:
            found.add(kind)
    return found


@schemathesis.check
def documented_refusals_only(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ALWAYS:
        return None
    try:
        kind = response.json().get("type", "")
    except ValueError:
        kind = ""
    allowed = documented_types(case.operation.definition.raw, status)
    if kind not in allowed:
        raise AssertionError(
            f"{case.operation.label}: a schema-valid request was refused with {status} "
            f"{kind or response.text[:200]!r}; the document names only {sorted(allowed)} "
            f"as rules of this answer"
        )
    return None


def _policies(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("steps"), list):
        return []
    return [
        step[field]
        for step in body["steps"]
        if isinstance(step, dict)
        for field in ("retry", "compensation_retry")
        if isinstance(step.get(field), dict)
    ]


def intervals_in_order(body: Any) -> bool:
    """Every retry policy of a definition has max_interval_seconds >= initial (defaults
    1 and 60)."""
    for policy in _policies(body):
        initial, ceiling = (
            policy.get("initial_interval_seconds", 1.0),
            policy.get("max_interval_seconds", 60.0),
        )
        numbers = all(isinstance(v, int | float) for v in (initial, ceiling))
        if numbers and ceiling < initial:
            return False
    return True


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    return intervals_in_order(body)
