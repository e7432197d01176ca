"""Pure view-model helpers: the step timeline, the SVG chart, why a saga waits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.commit import SagaState, Waiting
from app.core.decide import needs_compensation, pivot_passed
from app.core.definition import DefinitionSpec
from app.core.states import SagaStatus, WaitReason


@dataclass(frozen=True, slots=True)
class Bar:
    """One attempt drawn on the timeline."""

    step: str
    direction: str
    attempt: int
    outcome: str
    start: float  # seconds since the saga started
    end: float
    label: str  # hover text
    wait: bool = False  # a callback step's wait for its report, after the 202


def timeline(events: list[dict[str, Any]], started: datetime, now: datetime) -> list[Bar]:
    """Pair each attempt_started with its attempt_finished; an unfinished one runs to now.
    A callback step's accepted attempt (202) is followed by its wait, drawn up to the
    attempt's final outcome (the report taken, or the wait's end), or to now."""
    open_attempts: dict[tuple[str, str, int], datetime] = {}
    waits: dict[tuple[str, str, int], datetime] = {}
    bars: list[Bar] = []
    for e in events:
        key = (e.get("step") or "", e.get("direction") or "", e.get("attempt") or 0)
        if e["type"] == "attempt_started":
            open_attempts[key] = e["at"]
        elif e["type"] == "attempt_finished":
            waited = key in waits
            begin = waits.pop(key) if waited else open_attempts.pop(key, e["at"])
            detail = e.get("message") or ""
            code = e.get("status_code")
            label = f"{key[0]} {key[1]} #{key[2]}: {e.get('outcome')}"
            if waited:
                label = (
                    f"{key[0]} {key[1]} #{key[2]}: waited for its callback, then {e.get('outcome')}"
                )
            if code:
                label += f" ({code})"
            if detail:
                label += f" - {detail}"
            bars.append(
                Bar(
                    key[0],
                    key[1],
                    key[2],
                    str(e.get("outcome")),
                    (begin - started).total_seconds(),
                    (e["at"] - started).total_seconds(),
                    label,
                    wait=waited,
                )
            )
            if e.get("outcome") == "accepted":
                waits[key] = e["at"]
    for key, begin in waits.items():
        bars.append(
            Bar(
                key[0],
                key[1],
                key[2],
                "waiting",
                (begin - started).total_seconds(),
                (now - started).total_seconds(),
                f"{key[0]} {key[1]} #{key[2]}: accepted (202), waiting for its callback report",
                wait=True,
            )
        )
    for key, begin in open_attempts.items():
        bars.append(
            Bar(
                key[0],
                key[1],
                key[2],
                "in_flight",
                (begin - started).total_seconds(),
                (now - started).total_seconds(),
                f"{key[0]} {key[1]} #{key[2]}: in flight or abandoned by a crashed worker",
            )
        )
    return bars


def fill_buckets(
    buckets: list[dict[str, Any]], now: datetime, minutes: int = 60, step_minutes: int = 5
) -> list[dict[str, Any]]:
    """Every bucket of the window, oldest first, with zeros where nothing finished."""
    size = step_minutes * 60
    last = int(now.timestamp()) // size * size
    by_start = {int(b["at"].timestamp()): b for b in buckets}
    out = []
    for start in range(last - (minutes // step_minutes - 1) * size, last + 1, size):
        found = by_start.get(start)
        out.append(
            {
                "at": datetime.fromtimestamp(start, tz=now.tzinfo),
                "finished": found["finished"] if found else 0,
                "failed": found["failed"] if found else 0,
            }
        )
    return out


def chart_bars(
    buckets: list[dict[str, Any]], width: int = 600, height: int = 120
) -> dict[str, Any]:
    """Bar geometry for finished sagas per bucket, with the failed part drawn over it."""
    peak = max([b["finished"] for b in buckets] + [1])
    slot = width / max(len(buckets), 1)
    bars = []
    for i, b in enumerate(buckets):
        total_h = b["finished"] / peak * (height - 10)
        failed_h = b["failed"] / peak * (height - 10)
        bars.append(
            {
                "x": round(i * slot + 2, 1),
                "w": round(max(slot - 4, 1), 1),
                "total_y": round(height - total_h, 1),
                "total_h": round(total_h, 1),
                "failed_y": round(height - failed_h, 1),
                "failed_h": round(failed_h, 1),
                "label": f"{b['at']:%H:%M}: {b['finished']} finished, {b['failed']} not completed",
                "tick": f"{b['at']:%H:%M}",
            }
        )
    return {"bars": bars, "max": peak, "width": width, "height": height}


def why_waiting(
    status: SagaStatus,
    due_at: datetime | None,
    waiting: Waiting | None,
    lease_owner: str | None,
    lease_expires_at: datetime | None,
    now: datetime,
    last_error: dict[str, Any] | None,
    callback: tuple[str, datetime] | None = None,
) -> str | None:
    """A sentence that says what a non-terminal saga is waiting for. `callback`: the
    step that waits for its callback report, and when its wait ends."""
    if status.terminal:
        return None
    if lease_owner and lease_expires_at and lease_expires_at > now:
        return f"in progress: lease held by worker {lease_owner} until {lease_expires_at:%H:%M:%S}"
    if callback is not None:
        step, until = callback
        return (
            f"step '{step}' is waiting for its callback until {until:%H:%M:%S} "
            "(its participant answered 202; no report yet)"
        )
    if waiting is not None:
        service = waiting.service
        text = {
            WaitReason.CIRCUIT_OPEN: f"circuit of service '{service}' is open",
            WaitReason.HALF_OPEN_BUSY: f"waiting for the half-open probe to '{service}'",
            WaitReason.BULKHEAD_FULL: f"bulkhead of service '{service}' is full",
        }[waiting.reason]
        return f"{text}; next look at {due_at:%H:%M:%S}" if due_at else text
    if due_at and due_at > now:
        error = (
            f" after {last_error.get('kind')}: {last_error.get('message')}" if last_error else ""
        )
        return f"retry due at {due_at:%H:%M:%S}{error}"
    if due_at:
        return "due now: waiting for a free executor"
    return None


def compensations_if_failed(spec: DefinitionSpec, state: SagaState) -> list[str]:
    """The compensations that would run, in order, if the saga failed now: the engine's
    own rule, on the steps as they are stored (an unknown outcome is compensated too)."""
    if state.status is not SagaStatus.RUNNING or pivot_passed(spec, state):
        return []
    return [
        spec.steps[i].name
        for i in range(len(state.steps) - 1, -1, -1)
        if needs_compensation(spec.steps[i], state.steps[i])
    ]
