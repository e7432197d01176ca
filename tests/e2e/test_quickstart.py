"""Every shell block of docs/quickstart.md, run in order as one script."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "quickstart.md"


def shell_blocks(markdown: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", markdown, flags=re.S)


def test_quickstart_has_blocks() -> None:
    assert len(shell_blocks(QUICKSTART.read_text())) >= 5


@pytest.mark.slow
def test_every_quickstart_block_runs(db_url: str) -> None:
    script = "set -euo pipefail\n" + "\n".join(shell_blocks(QUICKSTART.read_text()))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "SAGA_PORT": str(free_port()),
        "EXAMPLES_PORT": str(free_port_block(4)),
        "SAGA_LOG_FORMAT": "console",
    }
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "order-1001: completed" in done.stdout, output
    assert "order-1002: compensated http_status" in done.stdout, output
    assert re.search(r'"refunds":\s*1\b', done.stdout), output
    assert "saga_finished_total" in done.stdout, output


def free_port_block(count: int) -> int:
    """A first port such that it and the next count-1 are free now."""
    for _ in range(50):
        first = free_port()
        ports = range(first, first + count)
        if all(_is_free(p) for p in ports):
            return first
    raise RuntimeError("no free block of ports")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
