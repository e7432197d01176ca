"""Ctrl-C and SIGTERM stop every command cleanly: what it started is stopped (participants,
the orchestrator subprocess, the embedded PostgreSQL), it exits 0, and prints no traceback.

Each command runs in its own session, as a terminal's foreground job would, and the
signal goes to its whole process group, as a terminal's Ctrl-C does. Every process of the
command carries a marker in its environment, so anything left behind is found even after
it detached (postgres started through pg_ctl does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import leftovers
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class Command:
    """A command in its own session, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.marker = uuid.uuid4().hex
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**env, leftovers.MARKER: self.marker},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while text not in self.output:
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} after {seconds}s:\n{self.output}")
            time.sleep(0.05)

    def signal_group(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, seconds: float) -> int:
        try:
            code = self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"still running {seconds}s after the signal:\n{self.output}")
        self._reader.join(timeout=5)
        return code

    def left_behind(self) -> list[leftovers.Leftover]:
        return leftovers.wait_gone(self.marker, exclude={os.getpid()}, seconds=3)

    def kill_all(self) -> None:
        with_marker = leftovers.marked(self.marker, exclude={os.getpid()})
        leftovers.kill(with_marker)


@pytest.fixture
def clean_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_") and k != "DATABASE_URL"}
    env.update(
        SAGA_DATA_DIR=str(tmp_path / ".saga"),
        SAGA_LOG_FORMAT="console",
        SAGA_ADMIN_TOKEN="shutdown-test-admin",
        SAGA_SHUTDOWN_GRACE="2",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    yield env


def _assert_clean(command: Command, code: int) -> None:
    left = command.left_behind()
    command.kill_all()
    assert not left, f"left running: {left}\n{command.output}"
    assert code == 0, f"exit status {code}\n{command.output}"
    assert "Traceback" not in command.output, command.output


@pytest.mark.parametrize("when", ["while starting", "during the scenarios"])
def test_ctrl_c_on_tasks_run_stops_everything(
    when: str, clean_env: dict[str, str], tmp_path: Path
) -> None:
    """`python3 tasks.py run` (the demo, on an embedded PostgreSQL), interrupted."""
    port = free_port()
    command = Command(
        [sys.executable, str(ROOT / "tasks.py"), "run", "demo", "--fast", "--port", str(port)],
        clean_env,
        tmp_path,
    )
    command.wait_for("participants", 120)
    if when == "during the scenarios":
        command.wait_for("(b)", 120)
    command.signal_group(signal.SIGINT)
    code = command.finish(90)
    _assert_clean(command, code)
    assert "Embedded PostgreSQL stopped." in command.output, command.output


def test_ctrl_c_on_serve_with_the_embedded_database(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    command = Command(
        [sys.executable, "-m", "app", "serve", "--port", str(port)], clean_env, tmp_path
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert command.proc.poll() is None, command.output
        assert time.monotonic() < deadline, command.output
        time.sleep(0.2)
    command.signal_group(signal.SIGINT)
    _assert_clean(command, command.finish(60))
    assert "stopping embedded PostgreSQL" in command.output, command.output


def test_a_signal_while_the_embedded_database_starts(
    clean_env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM right as the embedded server is being started: it is stopped, not orphaned."""
    command = Command([sys.executable, "-m", "app", "migrate"], clean_env, tmp_path)
    command.wait_for("starting embedded PostgreSQL", 60)
    command.signal_group(signal.SIGTERM)
    _assert_clean(command, command.finish(60))


def test_sigterm_on_a_worker(db_url: str, clean_env: dict[str, str], tmp_path: Path) -> None:
    command = Command(
        [sys.executable, "-m", "app", "worker"], {**clean_env, "DATABASE_URL": db_url}, tmp_path
    )
    command.wait_for("executor started", 60)
    command.signal_group(signal.SIGTERM)
    _assert_clean(command, command.finish(30))
    assert "executor stopped" in command.output, command.output
