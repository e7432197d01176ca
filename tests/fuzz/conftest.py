"""Fuzzing fixtures: quick or full sizes, the figures file, the run's seed.

`python3 tasks.py test` runs the fuzzers in their quick mode (a couple of minutes in all);
SAGA_CHAOS_FULL=1 runs many more examples. Each test appends its headline figures to
test-artifacts/chaos/figures.jsonl, like the chaos suite. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "test-artifacts" / "chaos" / "figures.jsonl"
Record = Callable[..., None]


def full_mode() -> bool:
    return os.environ.get("SAGA_CHAOS_FULL", "").strip().lower() in ("1", "true", "yes")


def mode() -> str:
    return "full" if full_mode() else "quick"


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Record:
    """`figures(**values)` appends one JSON line for this test to the figures file."""

    def record(**values: Any) -> None:
        line = {
            "test": request.node.nodeid,
            "mode": mode(),
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **values,
        }
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        with FIGURES.open("a") as out:
            out.write(json.dumps(line, default=str) + "\n")
        print("figures:", json.dumps(line, default=str))

    return record


@pytest.fixture
def fuzz_seed() -> int:
    """The run's seed; FUZZ_SEED=<n> replays one (it is printed, and shown on failure)."""
    value = int(os.environ.get("FUZZ_SEED") or random.randrange(1 << 30))
    print(f"FUZZ_SEED={value}")
    return value
