"""The resilience checklist (`app.core.checklist`): each rule on definitions that pass
it and definitions that break it, with a message that says what to change."""

from __future__ import annotations

from typing import Any

from app.core.checklist import Finding, Rule, checklist, review
from app.core.definition import DefinitionSpec, ServiceSpec

SVC = {"svc": ServiceSpec.model_validate({"base_url": "http://svc.test"})}
FAST = {"max_attempts": 3, "initial_interval_seconds": 0.1, "max_interval_seconds": 1}


def definition(*steps: dict[str, Any], **extra: Any) -> DefinitionSpec:
    return DefinitionSpec.model_validate({"name": "flow", "steps": list(steps), **extra})


def step(name: str, compensate: bool = True, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "action": {"service": "svc", "path": f"/{name}"},
        "retry": FAST,
        "timeout_seconds": 2,
    }
    if compensate:
        doc["compensation"] = {"service": "svc", "path": f"/{name}/undo"}
    doc.update(extra)
    return doc


def faults(spec: DefinitionSpec, rule: Rule, services: Any = SVC) -> list[Finding]:
    return [f for f in checklist(spec, services) if f.rule is rule and not f.ok]


SOUND = definition(
    step("reserve"),
    step("charge", pivot=True),
    step("ship", compensate=False, fallback={"response": {"queued": True}}),
    step("mail", compensate=False, critical=False),
    timeout_seconds=120,
)


def test_a_sound_definition_passes_every_rule_once_in_order() -> None:
    found = checklist(SOUND, SVC)
    assert [f.rule for f in found] == list(Rule)
    assert all(f.ok and f.step is None and f.message for f in found)
    assert review(SOUND, SVC).warnings == ()


# --- timeouts_defined --------------------------------------------------------------------------


def test_timeouts_times_attempts_must_fit_the_deadline() -> None:
    spec = definition(step("a"), step("b", timeout_seconds=5), timeout_seconds=12)
    (fault,) = faults(spec, Rule.TIMEOUTS_DEFINED)
    assert fault.step == "b"
    assert "15 s" in fault.message and "timeout_seconds" in fault.message


def test_a_callback_steps_wait_counts_as_its_attempts_timeout() -> None:
    spec = definition(step("a", callback={"timeout_seconds": 60}), timeout_seconds=120)
    (fault,) = faults(spec, Rule.TIMEOUTS_DEFINED)  # 3 waits of up to 60 s
    assert fault.step == "a" and "180 s" in fault.message and "callback" in fault.message


def test_the_service_timeout_counts_when_the_step_has_none() -> None:
    doc = step("a")
    del doc["timeout_seconds"]
    spec = definition(doc, timeout_seconds=25)
    slow = {"svc": ServiceSpec.model_validate({"base_url": "http://s", "timeout_seconds": 9})}
    quick = {"svc": ServiceSpec.model_validate({"base_url": "http://s", "timeout_seconds": 5})}
    assert [f.step for f in faults(spec, Rule.TIMEOUTS_DEFINED, slow)] == ["a"]  # 27 s
    assert faults(spec, Rule.TIMEOUTS_DEFINED, quick) == []  # 15 s
    assert [f.step for f in faults(spec, Rule.TIMEOUTS_DEFINED, None)] == ["a"]  # 10 s default


def test_without_a_deadline_timeouts_always_fit() -> None:
    assert faults(definition(step("a", timeout_seconds=600)), Rule.TIMEOUTS_DEFINED) == []


# --- retries_controlled -------------------------------------------------------------------------


def test_retries_need_jitter_bounded_attempts_and_a_capped_interval() -> None:
    spec = definition(
        step("a", retry={**FAST, "jitter": False}),
        step("b", retry={**FAST, "max_attempts": 50}),
        step("c", retry={**FAST, "max_interval_seconds": 3600}),
        step("d", compensation_retry={"jitter": False}),
        step("e", retry={"max_attempts": 1, "jitter": False}),  # never retried: no jitter needed
    )
    found = {f.step: f.message for f in faults(spec, Rule.RETRIES_CONTROLLED)}
    assert set(found) == {"a", "b", "c", "d"}
    assert "retry.jitter" in found["a"]
    assert "retry.max_attempts is 50" in found["b"]
    assert "retry.max_interval_seconds is 3600" in found["c"]
    assert "compensation_retry.jitter" in found["d"]


# --- compensation_missing -----------------------------------------------------------------------


def test_a_step_without_compensation_before_a_step_that_can_fail() -> None:
    spec = definition(step("a", compensate=False), step("b"))
    (fault,) = faults(spec, Rule.COMPENSATION_MISSING)
    assert fault.step == "a"
    assert "'b'" in fault.message and "add a compensation" in fault.message


def test_the_last_step_needs_no_compensation() -> None:
    assert (
        faults(definition(step("a"), step("b", compensate=False)), Rule.COMPENSATION_MISSING) == []
    )


def test_a_step_before_the_pivot_needs_a_compensation() -> None:
    spec = definition(
        step("a", compensate=False),
        step("p", pivot=True, fallback={"response": {}}),  # the pivot itself never unwinds
    )
    (fault,) = faults(spec, Rule.COMPENSATION_MISSING)
    assert "pivot 'p'" in fault.message


def test_steps_after_the_pivot_or_non_critical_need_none() -> None:
    spec = definition(
        step("a", compensate=False, critical=False),
        step("p", pivot=True),
        step("b", compensate=False),
        step("c"),
    )
    assert faults(spec, Rule.COMPENSATION_MISSING) == []


def test_later_steps_that_only_continue_do_not_count() -> None:
    spec = definition(
        step("a", compensate=False),
        step("b", critical=False),
        step("c", fallback={"response": {}}),
    )
    assert faults(spec, Rule.COMPENSATION_MISSING) == []
    # With a deadline, though, it can pass during b or c and unwind the saga.
    timed = definition(*[s.model_dump() for s in spec.steps], timeout_seconds=300)
    assert [f.step for f in faults(timed, Rule.COMPENSATION_MISSING)] == ["a"]


# --- isolation ---------------------------------------------------------------------------------


def test_absolute_urls_are_not_isolated() -> None:
    spec = definition(step("a"), {"name": "hook", "action": {"url": "https://x.example/h"}})
    (fault,) = faults(spec, Rule.ISOLATION)
    assert fault.step == "hook"
    assert "register the host as a service" in fault.message


def test_unknown_services_cannot_be_checked() -> None:
    (fault,) = faults(definition(step("a")), Rule.ISOLATION, services=None)
    assert "not known" in fault.message and "--services" in fault.message
    assert faults(definition(step("a")), Rule.ISOLATION, services={}) != []
    assert faults(definition(step("a")), Rule.ISOLATION) == []


# --- fallback_or_noncritical --------------------------------------------------------------------


def test_a_critical_step_after_the_pivot_without_a_fallback_ends_in_a_dead_letter() -> None:
    spec = definition(step("a"), step("p", pivot=True), step("ship"), step("mail", critical=False))
    (fault,) = faults(spec, Rule.FALLBACK_OR_NONCRITICAL)
    assert fault.step == "ship"
    assert "dead letter" in fault.message and "fallback" in fault.message


def test_without_a_pivot_nothing_is_dead_lettered() -> None:
    assert faults(definition(step("a"), step("b")), Rule.FALLBACK_OR_NONCRITICAL) == []


# --- deadline_reachable --------------------------------------------------------------------------


def test_a_step_whose_retries_outlast_the_deadline() -> None:
    slow = {"max_attempts": 6, "initial_interval_seconds": 5, "max_interval_seconds": 30}
    spec = definition(step("a"), step("b", retry=slow), timeout_seconds=20)
    found = faults(spec, Rule.DEADLINE_REACHABLE)
    assert [f.step for f in found] == ["b"]
    assert "http_5xx" in found[0].message


def test_retries_that_fit_alone_but_not_together() -> None:
    # Up to 2 + 4 = 6 s of delays each: either alone fits 10 s, both do not.
    retry = {"max_attempts": 3, "initial_interval_seconds": 2, "max_interval_seconds": 4}
    spec = definition(
        step("a", retry=retry, timeout_seconds=0.5),
        step("b", retry=retry, timeout_seconds=0.5),
        timeout_seconds=10,
    )
    (fault,) = faults(spec, Rule.DEADLINE_REACHABLE)
    assert fault.step is None
    assert "add up to 12 s" in fault.message


def test_no_deadline_is_always_reachable() -> None:
    slow = {"max_attempts": 10, "initial_interval_seconds": 60, "max_interval_seconds": 600}
    assert faults(definition(step("a", retry=slow)), Rule.DEADLINE_REACHABLE) == []


def test_a_deadline_that_passes_before_the_steps_are_reached() -> None:
    found = faults(definition(step("a"), step("b"), timeout_seconds=1e-7), Rule.DEADLINE_REACHABLE)
    assert [f.step for f in found] == ["a", "b"]
    assert "before this step is even reached" in found[0].message
