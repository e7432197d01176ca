"""Orchestrator processes (`python -m app serve|api|worker`) started, watched and stopped
from Python: the demo's process manager, and the crash, chaos and fuzz tests' too.

Each process runs in its own session (a signal to the launcher does not reach it by
accident), writes its output to a file, and is stopped with SIGTERM (then SIGKILL) or
killed outright on purpose. `close()` leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    """One `python -m app …` subprocess with its output in a file."""

    name: str
    command: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None
    started: float
    signalled_at: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        assert self.port is not None, f"{self.name} serves no HTTP"
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 150) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no output)"
        return "\n".join(lines[-tail:])

    def owns(self, worker: str | None) -> bool:
        """Whether an event's `worker` id (host:pid:random) belongs to this process."""
        return worker is not None and worker.split(":")[-2:-1] == [str(self.pid)]

    def kill(self) -> None:
        """SIGKILL: no goodbye, no drain, leases left behind."""
        if self.alive:
            self.signalled_at = time.monotonic()
            self.popen.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.alive:
            self.signalled_at = time.monotonic()
            self.popen.send_signal(signal.SIGTERM)

    async def wait_exit(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while self.alive:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} (pid {self.pid}) still running after {seconds}s\n{self.output()}"
                )
            await asyncio.sleep(0.05)
        return self.popen.returncode

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM and a graceful drain, then SIGKILL if it takes longer than `grace`."""
        self.terminate()
        with contextlib.suppress(TimeoutError):
            await self.wait_exit(grace)
        if self.alive:
            self.popen.kill()
            self.popen.wait()


class Launcher:
    """Starts orchestrator processes against one database; `close()` kills them all.

    Their environment is this process's without its SAGA_* and DATABASE_URL settings,
    then `defaults`, then what each `start` is given.
    """

    def __init__(self, db_url: str, workdir: Path, defaults: dict[str, Any] | None = None) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.defaults = {k: str(v) for k, v in (defaults or {}).items()}
        self.procs: list[Proc] = []

    def start(
        self, command: str, name: str | None = None, port: int | None = None, **env: Any
    ) -> Proc:
        name = name or f"{command}{len(self.procs)}"
        base = {
            k: v for k, v in os.environ.items() if not k.startswith("SAGA_") and k != "DATABASE_URL"
        }
        base.update({"DATABASE_URL": self.db_url, "PYTHONUNBUFFERED": "1", **self.defaults})
        base.update({k: str(v) for k, v in env.items()})
        args = [sys.executable, "-m", "app", command]
        if command in ("serve", "api"):
            port = port or free_port()
            args += ["--port", str(port)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            out.write(f"$ {' '.join(args)}  env: {env}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                args,
                cwd=self.workdir,  # no stray .env file
                env=base,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, command, popen, log, port, time.monotonic())
        self.procs.append(proc)
        return proc

    async def ready(self, proc: Proc, seconds: float = 40) -> None:
        """Wait until an HTTP process answers /readyz, or a worker's executor has started."""
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if not proc.alive:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode}\n{proc.output()}"
                    )
                if proc.port is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        r = await client.get(proc.url + "/readyz")
                        if r.status_code == 200:
                            return
                elif "executor started" in proc.output(tail=1_000_000):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.name} not ready after {seconds}s\n{proc.output()}")
                await asyncio.sleep(0.1)

    async def start_ready(
        self, command: str, name: str | None = None, port: int | None = None, **env: Any
    ) -> Proc:
        proc = self.start(command, name, port, **env)
        await self.ready(proc)
        return proc

    def dump(self) -> str:
        return "\n".join(
            f"===== {p.name}: {p.command} pid={p.pid} rc={p.popen.poll()} =====\n{p.output()}"
            for p in self.procs
        )

    def close(self) -> None:
        for p in self.procs:
            if p.alive:
                p.popen.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
