"""Deterministic crash points for the crash tests.

`SAGA_FAILPOINT=after_send_before_commit` kills the process with SIGKILL the first
time that point is reached; `name:N` kills it at the N-th time. `raise:name` raises an
unexpected error there every time instead (the liveness tests: a bug in the engine must
not keep a saga from ending). Unset in production.
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = frozenset(
    {
        "while_claiming",
        "before_send",
        "after_send_before_commit",
        "after_commit",
        "mid_compensation",
        "while_waiting",  # a callback step's wait was just committed
        "before_notify",  # the terminal commit landed; its notification is not sent yet
    }
)


class FailpointError(RuntimeError):
    """An unexpected error, on purpose."""


class Failpoints:
    def __init__(self, spec: str | None) -> None:
        self.name: str | None = None
        self.remaining = 0
        self.raises = False
        if spec:
            if spec.startswith("raise:"):
                self.raises, spec = True, spec.removeprefix("raise:")
            name, _, count = spec.partition(":")
            if name not in POINTS:
                raise ValueError(f"unknown failpoint {name!r}; known: {sorted(POINTS)}")
            self.name = name
            self.remaining = int(count) if count else 1

    def hit(self, name: str) -> None:
        if self.name != name:
            return
        if self.raises:
            raise FailpointError(f"failpoint {name}")
        self.remaining -= 1
        if self.remaining <= 0:
            sys.stderr.write(f"failpoint {name}: killing process {os.getpid()}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
