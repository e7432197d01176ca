"""Child processes of a benchmark run, each in its own process group, all stopped on exit.

Every child is started in a new session (so a Ctrl-C in the terminal reaches only the
harness, which then stops the children in order) with a parent-death signal (so that
even a SIGKILLed harness leaves nothing running). `Processes.stop_all` ends whatever is
still running, newest first: SIGTERM (or the process's own stop signal) to its process
group, then SIGKILL to the group after a grace period; last, any process that still
carries the run's marker in its environment (one that left its group) is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _death_signal(sig: int) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the harness dies, however it dies.

    It runs after the switch to another user (subprocess changes uid first), which
    matters: a credential change clears the parent-death signal.
    """
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the harness died between fork and prctl
            os._exit(1)

    return preexec


class ChildFailed(RuntimeError):
    """A child exited or did not answer; the message ends with the tail of its log."""


class NoAnswer(ChildFailed):
    """A child did not answer in time (it may still)."""


class Proc:
    """One child process (the leader of its own process group)."""

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        log: Path,
        stop_signal: int,
        group_signal: bool,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.stop_signal = stop_signal
        self.group_signal = group_signal
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pgid(self) -> int:
        return self.popen.pid  # start_new_session: the child leads its own group

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> ChildFailed:
        code = self.popen.poll()
        state = "running" if code is None else f"exited {code}"
        return ChildFailed(f"{self.name} ({state}): {what}\n--- {self.log} ---\n{self.log_tail()}")

    # The line protocol of the load generators (bench/protocol.py): one JSON object a line.

    def send(self, message: Mapping[str, Any]) -> None:
        if self.popen.stdin is None:
            raise self.failure("has no stdin pipe")
        try:
            self.popen.stdin.write(json.dumps(message).encode() + b"\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self.failure(f"cannot be written to ({exc})") from exc

    def receive(self, timeout: float) -> dict[str, Any]:
        if self.popen.stdout is None:
            raise self.failure("has no stdout pipe")
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer(str(self.failure(f"no answer within {timeout:.1f}s")))
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self.failure("closed its output")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise self.failure(f"answered an error: {answer['error']}")
        return answer

    def request(self, message: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        self.send(message)
        return self.receive(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop signal, wait up to `timeout`, then SIGKILL the whole process group."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if self.group_signal:
                    os.killpg(self.pgid, self.stop_signal)
                else:
                    os.kill(self.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Anything left in the group (the leader, or children it started) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
        return self.popen.poll()


# Every process of a run inherits MARKER=<run id> in its environment (the harness sets
# it in its own), so that whatever escaped its process group is still found at the end.
MARKER = "BENCH_SAGA_RUN"  # not SAGA_*: those are dropped from the services


def marked(value: str) -> list[int]:
    """Live processes other than this one whose environment holds MARKER=value."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


class Processes:
    """Starts children and remembers them until they are stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Proc] = []
        self._count = 0
        self.run_id = os.urandom(8).hex()
        os.environ[MARKER] = self.run_id

    def spawn(
        self,
        name: str,
        argv: Sequence[str | Path],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        pipe: bool = False,
        stop_signal: int = signal.SIGTERM,
        group_signal: bool = True,
        death_signal: int = signal.SIGTERM,
    ) -> Proc:
        """Start `argv`; its stderr (and stdout unless `pipe`) go to a log file."""
        self._count += 1
        log = self.log_dir / f"{self._count:02d}-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else out,
                stderr=out,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                start_new_session=True,
                preexec_fn=_death_signal(death_signal),  # the harness starts no threads
            )
        proc = Proc(name, popen, log, stop_signal, group_signal)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 15.0) -> int | None:
        code = proc.stop(timeout)
        if proc in self.running:
            self.running.remove(proc)
        return code

    def stop_all(self) -> list[int]:
        """Stop every child, newest first; then SIGKILL any process still carrying this
        run's marker (there should be none) and return their pids."""
        for proc in reversed(list(self.running)):
            self.stop(proc)
        deadline = time.monotonic() + 10
        left = marked(self.run_id)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = marked(self.run_id)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left


def wait_until(
    check: Callable[[], bool], timeout: float, proc: Proc | None = None, what: str = ""
) -> None:
    """Poll `check` until it is true; fail early when `proc` exits."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and not proc.alive():
            raise proc.failure(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            if proc is not None:
                raise proc.failure(f"not {what} within {timeout:.0f}s")
            raise TimeoutError(f"not {what} within {timeout:.0f}s")
        time.sleep(0.05)
