"""A private PostgreSQL server that a test starts, stops and restarts on its own port.

The database-fault tests cannot break the shared test server, so they run their own:
`initdb` in a fresh directory, listening on 127.0.0.1 only, trust authentication.
The binaries are the system's PostgreSQL (`/usr/lib/postgresql/<version>/bin`) when
installed, else the ones pgserver ships. PostgreSQL refuses to run as root, so as root
every command runs as the `postgres` OS user (or `pgserver`, which pgserver creates).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from tests.support.servers import free_port

SYSTEM_ROOT = Path("/usr/lib/postgresql")
NEEDED = ("initdb", "pg_ctl", "postgres")


def _system_bin() -> Path | None:
    if not SYSTEM_ROOT.is_dir():
        return None
    versions = sorted(
        (p for p in SYSTEM_ROOT.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )
    for version in reversed(versions):
        bin_dir = version / "bin"
        if all((bin_dir / name).exists() for name in NEEDED):
            return bin_dir
    return None


def _pgserver_bin() -> Path | None:
    try:
        bin_dir = Path(_pgserver_utils().__file__).parent / "pginstall" / "bin"
    except ImportError:
        return None
    return bin_dir if all((bin_dir / name).exists() for name in NEEDED) else None


def _pgserver_utils() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from pgserver import utils
    return utils


def _run_as_user() -> str | None:
    """The OS user PostgreSQL runs as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    # Neither exists (a root container without system PostgreSQL): do what pgserver does.
    _pgserver_utils().ensure_user_exists("pgserver")
    return "pgserver"


def _open_up(bin_dir: Path) -> None:
    """pgserver's bundled binaries may sit under a root-only prefix: let others traverse."""
    utils = _pgserver_utils()
    utils.ensure_prefix_permissions(bin_dir)
    read, execute = 0o044, 0o011
    utils.ensure_folder_permissions(bin_dir, execute | read)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", read)


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory; `url` reaches its `postgres` db."""

    def __init__(self, port: int | None = None) -> None:
        system = _system_bin()
        bin_dir = system or _pgserver_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL binaries: neither system PostgreSQL nor pgserver")
        self.bin_dir: Path = bin_dir
        self.user = _run_as_user()
        if system is None and self.user is not None:
            _open_up(self.bin_dir)
        self.port = port or free_port()
        # Not under pytest's tmp_path: that is root-only, and the server runs as another user.
        self.root = Path(tempfile.mkdtemp(prefix="saga-private-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.socket_dir = self.root / "sock"
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            user=self.user,
            cwd=self.root,  # the server's user may not be able to read the test's cwd
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
                f"\n--- server log ---\n{self.server_log()}"
            )
        return result

    def server_log(self, tail: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return "(no server log)"

    def init(self) -> None:
        self.socket_dir.mkdir()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            # The OS never crashes in these tests, only the server: what reached the
            # kernel survives, so fsync can go. synchronous_commit must stay on: an
            # `immediate` stop would lose commits the clients were told about.
            "fsync": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# private test server\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self._wait_accepting(30)

    def stop(self, mode: str = "fast") -> None:
        """`fast` disconnects clients and shuts down cleanly; `immediate` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, mode: str = "fast", down_seconds: float = 0.0) -> None:
        self.stop(mode)
        if down_seconds:
            time.sleep(down_seconds)
        self.start()
        self.restarts += 1

    def running(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"],
            user=self.user,
            cwd=self.root,
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def _wait_accepting(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def execute(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.database_url(database), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.data.exists() and self.running():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(port: int | None = None) -> Iterator[PrivatePostgres]:
    """A started private server, stopped and deleted on exit."""
    server = PrivatePostgres(port)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()
