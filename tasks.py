#!/usr/bin/env python3
"""Set up and run the project from a fresh clone, with nothing but Python >= 3.11.

    python3 tasks.py run     # install into .venv, run the checkout demo on embedded PostgreSQL
    python3 tasks.py run serve  # ... or any other saga-orchestrator command
    python3 tasks.py test    # install into .venv, then ruff, mypy and pytest
    python3 tasks.py chaos   # the chaos suite at full size (figures in test-artifacts/chaos/)
    python3 tasks.py bench   # the benchmark vs DBOS and a floor (--quick: ~1 min; bench/README.md)
    python3 tasks.py lock    # refresh constraints.txt from pyproject.toml (--upgrade: newest)

Everything the project needs is installed by this file into ./.venv, at the versions
pinned in constraints.txt (pyproject.toml keeps the ranges).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed"
LOCK = ROOT / "constraints.txt"


def _run(*cmd: str | Path, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run a command to its end. Ctrl-C and SIGTERM are handed to it (once) and we wait
    for it to stop what it started: it runs in its own process group, so a terminal's
    Ctrl-C reaches only this process, which passes it on, and nothing is killed halfway."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    child = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, process_group=0)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if check and code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return code


def _digest() -> str:
    """What the installation depends on: the ranges and the pinned versions."""
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", LOCK):
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the project with its dev tools, at the versions of
    constraints.txt, when pyproject.toml or constraints.txt changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before the venv exists
        sys.exit(f"Python >= 3.11 is needed; this is {sys.version.split()[0]}")
    digest = _digest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    pinned = ["-c", LOCK] if LOCK.exists() else []  # absent only while it is first made
    _run(BIN / "python", "-m", "pip", "install", "--quiet", *pinned, "-e", ".[dev]")
    STAMP.write_text(digest)


def cmd_lock(args: list[str]) -> int:
    """Pin the project and its dev extra in constraints.txt with pip-compile (pip-tools, a
    dev dependency); `--upgrade` takes the newest versions the ranges allow. Run it on
    the oldest supported Python (3.11), so that its backports are pinned too."""
    ensure_venv()
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "python3 tasks.py lock"}
    code = _run(
        BIN / "pip-compile",
        "--quiet",
        "--extra",
        "dev",
        "--strip-extras",
        "--no-emit-index-url",
        "--no-emit-trusted-host",
        "--no-emit-find-links",
        "--output-file",
        LOCK,
        *args,
        "pyproject.toml",
        check=False,
        env=env,
    )
    if code == 0:
        ensure_venv()  # the stamp follows the lock: install what it now pins
    return code


def cmd_run(args: list[str]) -> int:
    ensure_venv()
    return _run(BIN / "saga-orchestrator", *(args or ["demo"]), check=False)


def cmd_lint(_: list[str]) -> int:
    ensure_venv()
    if _run(BIN / "ruff", "check", ".", check=False):
        return 1
    if _run(BIN / "ruff", "format", "--check", ".", check=False):
        return 1
    if _run(BIN / "lint-imports", check=False):  # the layers' import rules (pyproject.toml)
        return 1
    return _run(BIN / "mypy", check=False)


def cmd_test(args: list[str]) -> int:
    ensure_venv()
    if cmd_lint([]):
        print("lint or type check failed", file=sys.stderr)
        return 1
    return _run(BIN / "python", "-m", "pytest", *args, check=False)


def cmd_chaos(args: list[str]) -> int:
    """The chaos suite at the issue's sizes, plus the crash tests and fuzzing, then the
    30-minute soak; `test` runs all of it in a quick mode."""
    ensure_venv()
    env = {**os.environ, "SAGA_CHAOS_FULL": "1"}
    cmd = [str(BIN / "python"), "-m", "pytest", "-p", "no:cacheprovider"]
    cmd += ["tests/chaos", "tests/e2e/test_crash.py", "tests/fuzz", *args]
    print("+ SAGA_CHAOS_FULL=1", end=" ", flush=True)
    failed = _run(*cmd, check=False, env=env)
    soak = _run(BIN / "python", "-m", "tests.chaos.soak", "--minutes", "30", check=False)
    return failed or soak


def cmd_bench(args: list[str]) -> int:
    """The benchmark (bench/README.md); it stops every process it started, also on Ctrl-C."""
    ensure_venv()
    return _run(BIN / "python", "bench/run.py", *args, check=False)


COMMANDS = {
    "run": cmd_run,
    "test": cmd_test,
    "lint": cmd_lint,
    "chaos": cmd_chaos,
    "bench": cmd_bench,
    "lock": cmd_lock,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))


if __name__ == "__main__":
    main()
