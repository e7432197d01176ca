"""Chaos suite fixtures: quick or full sizes, the figures file, orchestrator subprocesses
and the tracking participant (see tests.support.crash).

`python3 tasks.py test` runs this suite in its quick mode; `python3 tasks.py chaos` sets
SAGA_CHAOS_FULL=1 for the sizes the issue asks for. Every test appends its headline
figures to test-artifacts/chaos/figures.jsonl, from which docs/reliability.md is filled.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.crash import Launcher, TrackingParticipant
from tests.support.servers import serve

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "test-artifacts" / "chaos" / "figures.jsonl"


def full_mode() -> bool:
    return os.environ.get("SAGA_CHAOS_FULL", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Scale:
    """How big each chaos run is."""

    mode: str
    replica_sagas: int  # item 2: sagas through 3 executors, one paused
    replica_rate: float  # sagas started per second
    db_sagas: int  # item 3: sagas started before the database faults
    db_restarts: int
    db_terminations: int  # pg_terminate_backend rounds
    fault_sagas: int  # item 4: sagas per (fault kind, rate) cell
    fault_start_rate: float  # sagas started per second (below what the executor manages)
    same_key_requests: int  # item 5: concurrent starts with one key
    distinct_keys: int  # item 5: distinct keys started in parallel


QUICK = Scale(
    mode="quick",
    replica_sagas=100,
    replica_rate=10,
    db_sagas=40,
    db_restarts=2,
    db_terminations=2,
    fault_sagas=24,
    fault_start_rate=30,
    same_key_requests=200,
    distinct_keys=1000,
)
FULL = Scale(
    mode="full",
    replica_sagas=1000,
    replica_rate=15,
    db_sagas=200,
    db_restarts=5,
    db_terminations=5,
    fault_sagas=200,
    fault_start_rate=25,
    same_key_requests=200,
    distinct_keys=1000,
)


@pytest.fixture(scope="session")
def chaos_scale() -> Scale:
    return FULL if full_mode() else QUICK


Record = Callable[..., None]


@pytest.fixture
def figures(request: pytest.FixtureRequest, chaos_scale: Scale) -> Record:
    """`figures(**values)` appends one JSON line for this test to the figures file."""

    def record(**values: Any) -> None:
        line = {
            "test": request.node.nodeid,
            "mode": chaos_scale.mode,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **values,
        }
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        with FIGURES.open("a") as out:
            out.write(json.dumps(line, sort_keys=False, default=str) + "\n")
        print("figures:", json.dumps(line, default=str))

    return record


@pytest.fixture
def seed() -> int:
    """The run's random seed; CHAOS_SEED=<n> replays one (it is shown on failure)."""
    value = int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))
    print(f"CHAOS_SEED={value}")
    return value


@pytest.fixture
async def tracker(seed: int) -> AsyncIterator[TrackingParticipant]:
    """The tracking participant (call lifetimes, overlaps), served on 127.0.0.1."""
    p = TrackingParticipant(seed=seed)
    async with serve(p.app) as base:
        p.url = base
        yield p


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[[str], Launcher]]:
    """`launch(database_url)`: a Launcher of orchestrator subprocesses on that database.
    All are killed at the end; their output is printed (pytest shows it on failure)."""
    launchers: list[Launcher] = []

    def make(db_url: str) -> Launcher:
        launcher = Launcher(db_url, tmp_path)
        launchers.append(launcher)
        return launcher

    try:
        yield make
    finally:
        for launcher in launchers:
            launcher.close()
        for launcher in launchers:
            print(launcher.dump())


def scale_dict(scale: Scale) -> dict[str, Any]:
    return asdict(scale)
