#!/usr/bin/env python3
"""Set up and run the project from a fresh clone, with nothing but Python >= 3.11.

    python3 tasks.py run     # install into .venv, run the checkout demo on embedded PostgreSQL
    python3 tasks.py run serve  # ... or any other saga-orchestrator command
    python3 tasks.py test    # install into .venv, then ruff, mypy and pytest
    python3 tasks.py chaos   # the chaos suite at full size (figures in test-artifacts/chaos/)
    python3 tasks.py bench   # the benchmark vs DBOS and a floor (--quick: ~1 min; bench/README.md)

Everything the project needs is installed by this file into ./.venv.
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


def ensure_venv() -> None:
    """Create .venv and install the project with its dev tools when pyproject.toml changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before the venv exists
        sys.exit(f"Python >= 3.11 is needed; this is {sys.version.split()[0]}")
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    _run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    STAMP.write_text(digest)


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
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))


if __name__ == "__main__":
    main()
