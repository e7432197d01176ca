"""The benchmark's own PostgreSQL: a fresh cluster on a free port, durable like production.

Unlike the test suite's private server (tests/support/private_pg.py, whose binary and
OS-user discovery this reuses) it keeps `fsync` and `full_page_writes` on: a commit
costs what it costs in production. It loads pg_stat_statements with `track = all`, and
the postmaster runs as a child of the harness (`postgres -D …` in its own process
group, stopped with SIGINT, a fast shutdown), so it cannot outlive the run.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from bench.procs import Proc, Processes, wait_until
from tests.support.private_pg import _open_up, _pgserver_bin, _run_as_user, _system_bin
from tests.support.servers import free_port

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "300",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.max": "20000",
    # Fewer forced checkpoints while the million-saga history is loaded.
    "max_wal_size": "'4GB'",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class BenchPostgres:
    """A PostgreSQL cluster under `root`; `url(db)` reaches database `db` on it."""

    def __init__(self, procs: Processes, root: Path) -> None:
        system = _system_bin()
        bin_dir = system or _pgserver_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries: neither system PostgreSQL nor pgserver")
        self.bin_dir: Path = bin_dir
        self.user = _run_as_user()
        if system is None and self.user is not None:
            _open_up(self.bin_dir)
        self.procs = procs
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.port = free_port()
        self.proc: Proc | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        initdb = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres"]
        initdb += ["--auth=trust", "--encoding=UTF8", "--no-sync"]
        result = subprocess.run(
            initdb, user=self.user, cwd=self.root, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# saga benchmark server\n")
            conf.write(f"port = {self.port}\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            for key, value in SETTINGS.items():
                conf.write(f"{key} = {value}\n")
        self.proc = self.procs.spawn(
            "postgres",
            [self.bin_dir / "postgres", "-D", self.data],
            cwd=self.root,
            user=self.user,
            stop_signal=signal.SIGINT,  # fast shutdown: disconnect clients, checkpoint, exit
            group_signal=False,
            death_signal=signal.SIGINT,
        )
        wait_until(self._accepting, 60, self.proc, "accepting connections")
        self.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def _accepting(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, timeout=60)
            self.proc = None

    def execute(self, statement: str, params: Any = None, database: str = "postgres") -> list[Any]:
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str) -> str:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def version(self) -> str:
        return str(self.execute("SHOW server_version")[0][0])
