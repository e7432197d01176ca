"""Processes a test run left behind, found by a marker every child inherits.

The session sets `ORCHESTRATOR_TEST_RUN` in its own environment; every process it starts,
directly or through others (a `serve` subprocess, the postgres that `pg_ctl` detaches),
inherits it. At the end of the run, any process that still carries the marker is one the
tests failed to stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "ORCHESTRATOR_TEST_RUN"


@dataclass(frozen=True, slots=True)
class Leftover:
    pid: int
    args: str


def marked(value: str, exclude: set[int] | None = None) -> list[Leftover]:
    """Processes (other than `exclude`) whose environment holds MARKER=value."""
    needle = f"{MARKER}={value}".encode()
    found: list[Leftover] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (exclude or set()):
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0"):
                continue
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":  # a zombie is already dead; its parent has yet to reap it
            found.append(Leftover(int(entry.name), args.strip()))
    return found


def wait_gone(value: str, exclude: set[int], seconds: float) -> list[Leftover]:
    """Give stopping processes a moment, then report who is still there."""
    deadline = time.monotonic() + seconds
    while True:
        left = marked(value, exclude)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill(leftovers: list[Leftover]) -> None:
    for leftover in leftovers:
        with contextlib.suppress(OSError):
            os.kill(leftover.pid, signal.SIGKILL)
