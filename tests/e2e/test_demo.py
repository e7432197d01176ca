"""`saga-orchestrator demo` end to end: the newcomer's first command runs every scenario
against a real database and a real orchestrator subprocess, and reports them passed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["a", "b", "c", "d", "e", "f"]
VERDICT = re.compile(r"^\s*(PASS|FAIL)\s+\((\w)\)\s+(.*)$")
LINK = re.compile(r"http://127\.0\.0\.1:(\d+)/admin/sagas/[0-9a-f-]{36}$")


def test_demo_passes_every_scenario(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_") and k != "DATABASE_URL"}
    env.update(
        DATABASE_URL=db_url,
        SAGA_DATA_DIR=str(tmp_path / ".saga"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "demo", "--fast", "--exit", "--port", str(port)],
        cwd=tmp_path,  # no stray .env file
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its orchestrator child shares the group: killpg gets both
    )
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        log = tmp_path / ".saga" / "demo-orchestrator.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        pytest.fail(f"the demo did not finish in time\n{output.decode()}\n--- log\n{tail}")
    finally:
        if proc.poll() is None:  # pragma: no cover - only when communicate() blew up
            os.killpg(proc.pid, signal.SIGKILL)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{text}"

    verdicts: dict[str, str] = {}
    links: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if match := VERDICT.match(line):
            current = match.group(2)
            verdicts[current] = match.group(1)
            links[current] = []
        elif current and (link := LINK.search(line.strip())):
            assert link.group(1) == str(port)
            links[current].append(link.group(0))
        else:
            current = None
    assert verdicts == dict.fromkeys(SCENARIOS, "PASS"), text
    assert all(links[key] for key in SCENARIOS), f"a scenario shows no saga link\n{text}"
    assert "All 6 scenarios passed." in text
    assert f"http://127.0.0.1:{port}/admin" in text
    assert re.search(r"Admin token\s+\S{16,}", text), text
    assert "Traceback" not in text, text

    # Nothing is left running: the orchestrator child was stopped with the demo.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the orchestrator still answers"
