"""The systems under test, each on its own database of the benchmark server.

- A `serve`: `saga-orchestrator serve`, API and executor in one process.
- B `api+2 workers`: `saga-orchestrator migrate`, then one `api` and two `worker`s.
- C `DBOS`: bench/dbos_app.py, DBOS Transact in its own virtualenv.
- D `floor`: bench/floor.py, the hand-rolled minimum.

A system is started for a round and stopped after it. `pgids` are the process groups
whose CPU and memory count as the system's (never the driver's); `load` is the process
that speaks bench/protocol.py (the HTTP driver, or for the floor the floor itself).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.pg import BenchPostgres
from bench.procs import ChildFailed, Proc, Processes, wait_until
from tests.support.servers import free_port

BENCH = Path(__file__).resolve().parent
PYTHON = Path(sys.executable)
SAGA_BIN = PYTHON.parent / "saga-orchestrator"
DBOS_VENV = BENCH / ".dbos-venv"
DBOS_REQUIREMENTS = BENCH / "dbos-requirements.txt"

THREE = "bench3"  # steps on three services
ONE = "bench1"  # the same steps, all on one service
SLOW = "benchslow"  # the first step answers after --slow-seconds (in-flight scenario)
SERVICES = ("svc-a", "svc-b", "svc-c")


@dataclass
class Env:
    procs: Processes
    pg: BenchPostgres
    run_dir: Path
    participant: str
    participant_pgid: int
    token: str
    dbos_python: Path | None
    baseline_client: str = "aiohttp"  # how C and D call the participant (bench/post.py)


def _step(name: str, service: str, path: str) -> dict[str, Any]:
    return {
        "name": name,
        "action": {"service": service, "path": path, "body": {"saga": "${saga.id}"}},
        "compensation": {
            "service": service,
            "path": f"{path}/undo",
            "body": {"saga": "${saga.id}"},
        },
    }


DEFINITIONS: list[dict[str, Any]] = [
    {
        "name": THREE,
        "steps": [_step(s, svc, f"/{s}") for s, svc in zip("abc", SERVICES, strict=True)],
    },
    {"name": ONE, "steps": [_step(s, SERVICES[0], f"/{s}") for s in "abc"]},
    {
        "name": SLOW,
        "timeout_seconds": 600,
        "steps": [
            _step("a", "svc-slow", "/slow"),
            _step("b", SERVICES[1], "/b"),
            _step("c", SERVICES[2], "/c"),
        ],
    },
]


def http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _clean_environ() -> dict[str, str]:
    """The harness's environment without settings that would change what is measured."""
    drop = ("SAGA_", "DATABASE_URL", "OTEL_", "DBOS_", "PG")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


class System:
    key = "?"
    label = "?"
    description = ""

    def __init__(self, env: Env, database: str) -> None:
        self.env = env
        self.database = database
        self.databases = [database]
        self.procs: list[Proc] = []
        self.load: Proc | None = None
        self.options: dict[str, Any] = {}
        self.created = False

    @property
    def url(self) -> str:
        return self.env.pg.url(self.database)

    @property
    def pgids(self) -> list[int]:
        return [p.pgid for p in self.procs]

    def setup(self) -> None:
        """Create the system's database (once, before its first round)."""
        if not self.created:
            for name in self.databases:
                self.env.pg.create_database(name)
            self.created = True

    def spawn(self, name: str, argv: list[str | Path], **kwargs: Any) -> Proc:
        proc = self.env.procs.spawn(f"{self.key}-{name}", argv, **kwargs)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        raise NotImplementedError

    def start_driver(self, kind: str, base: str) -> None:
        argv: list[str | Path] = [PYTHON, BENCH / "driver.py", "--kind", kind, "--base", base]
        if kind == "saga":
            argv += ["--token", self.env.token]
        self.load = self.env.procs.spawn(f"{self.key}-driver", argv, pipe=True)
        self.load.request({"cmd": "ping"}, 60)

    def stop(self) -> None:
        if self.load is not None and self.load not in self.procs:
            self.env.procs.stop(self.load)
        self.load = None
        for proc in reversed(self.procs):
            self.env.procs.stop(proc)
        self.procs = []


class SagaSystem(System):
    """The orchestrator; `extra_env` tunes it (the in-flight scenario)."""

    def __init__(self, env: Env, database: str, extra_env: Mapping[str, str] | None = None):
        super().__init__(env, database)
        self.extra_env = dict(extra_env or {})
        self.options = {"definition": THREE}
        self.base = ""

    def saga_env(self) -> dict[str, str]:
        return {
            **_clean_environ(),
            "DATABASE_URL": self.url,
            "SAGA_ADMIN_TOKEN": self.env.token,
            "SAGA_API_TOKEN": self.env.token,
            "SAGA_LOG_LEVEL": "WARNING",
            "SAGA_ALLOWED_HOSTS": "127.0.0.1",
            "SAGA_SHUTDOWN_GRACE": "5",
            "SAGA_DATA_DIR": str(self.env.run_dir / "saga-data"),
            **self.extra_env,
        }

    def spawn_saga(self, name: str, *args: str) -> Proc:
        # cwd: the run directory, so that no .env of a working tree is read.
        return self.spawn(name, [SAGA_BIN, *args], env=self.saga_env(), cwd=self.env.run_dir)

    def api_ready(self, proc: Proc) -> None:
        wait_until(lambda: http_ready(self.base + "/readyz"), 120, proc, "ready")

    def register(self, slow_max_concurrency: int = 64) -> None:
        headers = {"Authorization": f"Bearer {self.env.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as client:
            services = {name: (10, 64) for name in SERVICES}
            services["svc-slow"] = (60, max(64, slow_max_concurrency))
            for name, (timeout, concurrency) in services.items():
                r = client.put(
                    f"/v1/services/{name}",
                    json={
                        "base_url": self.env.participant,
                        "timeout_seconds": timeout,
                        "max_concurrency": concurrency,
                    },
                )
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"PUT /v1/services/{name}: {r.status_code} {r.text}")
            for definition in DEFINITIONS:
                r = client.post("/v1/definitions", json=definition)
                if r.status_code not in (200, 201):
                    raise RuntimeError(f"POST /v1/definitions: {r.status_code} {r.text}")


class Serve(SagaSystem):
    key = "A"
    label = "serve"
    description = "saga-orchestrator serve: API and executor in one process"

    def start(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        proc = self.spawn_saga("serve", "serve", "--port", str(port))
        self.api_ready(proc)
        self.register(int(self.extra_env.get("SAGA_WORKER_CONCURRENCY", "64")))
        self.start_driver("saga", self.base)


class Split(SagaSystem):
    key = "B"
    label = "api+2 workers"
    description = "saga-orchestrator migrate, then one api and two worker processes"
    workers = 2

    def start(self) -> None:
        migrate = self.env.procs.spawn(
            f"{self.key}-migrate",
            [SAGA_BIN, "migrate"],
            env=self.saga_env(),
            cwd=self.env.run_dir,
        )
        try:
            code = migrate.popen.wait(180)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            self.env.procs.stop(migrate)
        if code != 0:
            raise migrate.failure("migrate failed")
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        api = self.spawn_saga("api", "api", "--port", str(port))
        self.api_ready(api)
        self.register()
        workers = [self.spawn_saga(f"worker{i + 1}", "worker") for i in range(self.workers)]
        time.sleep(1.0)
        for worker in workers:
            if not worker.alive():
                raise worker.failure("exited at start")
        self.start_driver("saga", self.base)


class Dbos(System):
    key = "C"
    label = "DBOS"
    description = "DBOS Transact: @DBOS.workflow with three @DBOS.steps, behind FastAPI"

    def start(self) -> None:
        if self.env.dbos_python is None:
            raise RuntimeError("the DBOS virtualenv is not available")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = _clean_environ()
        argv: list[str | Path] = [self.env.dbos_python, BENCH / "dbos_app.py", "--port", str(port)]
        argv += ["--db", self.url, "--participant", self.env.participant]
        argv += ["--client", self.env.baseline_client]
        proc = self.spawn("dbos", argv, env=env, cwd=self.env.run_dir)
        wait_until(lambda: http_ready(base + "/healthz"), 120, proc, "ready")
        self.start_driver("dbos", base)


class Floor(System):
    key = "D"
    label = "floor"
    description = "hand-rolled: 5 autocommit statements and 3 HTTP calls per saga, no API"

    def start(self) -> None:
        argv: list[str | Path] = [PYTHON, BENCH / "floor.py", "--db", self.url]
        argv += ["--participant", self.env.participant, "--client", self.env.baseline_client]
        self.load = self.spawn("floor", argv, env=_clean_environ(), pipe=True)
        self.load.request({"cmd": "ping"}, 60)


def ensure_dbos_venv(log: Path) -> tuple[Path, str]:
    """bench/.dbos-venv with the pinned requirements; rebuilt when they change."""
    digest = hashlib.sha256(DBOS_REQUIREMENTS.read_bytes()).hexdigest()
    stamp = DBOS_VENV / ".installed"
    python = DBOS_VENV / "bin" / "python"
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
        print(f"installing {DBOS_REQUIREMENTS.name} into {DBOS_VENV} (once)", flush=True)
        with log.open("ab") as out:
            steps = [
                [str(PYTHON), "-m", "venv", "--clear", str(DBOS_VENV)],
                [str(python), "-m", "pip", "install", "--quiet", "-r", str(DBOS_REQUIREMENTS)],
            ]
            for cmd in steps:
                if subprocess.run(cmd, stdout=out, stderr=out, check=False).returncode != 0:
                    raise ChildFailed(f"{' '.join(cmd)} failed; see {log}")
        stamp.write_text(digest)
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('dbos'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return python, version
