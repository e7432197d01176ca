"""What we ship is safe as shipped: the compose file and Dockerfile hold no default
secret, and the service refuses to listen off loopback without a strong admin token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.settings import exposure
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDERS = re.compile(r"change-?me|password|secret|admin|example", re.IGNORECASE)


def test_the_compose_file_has_no_default_secret() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    orchestrator = compose["services"]["orchestrator"]
    env = orchestrator["environment"]
    for name in ("SAGA_ADMIN_TOKEN", "SAGA_API_TOKEN", "SAGA_ALLOWED_HOSTS"):
        value = str(env[name])
        # `${VAR:?message}`: compose refuses to start without it; no fallback value.
        assert re.fullmatch(r"\$\{" + name + r":\?[^}]*\}", value), (name, value)
    password = compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert str(password).startswith("${POSTGRES_PASSWORD:?"), password
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    for value in env.values():
        text = str(value)
        assert ":-" not in text or text.endswith(":-}"), f"a default value in {text}"
        literal = re.sub(r"\$\{[^}]*\}", "", text)
        assert not PLACEHOLDERS.search(literal), text
    # Published on loopback only: a proxy in front decides who reaches it.
    assert all(str(p).startswith("127.0.0.1:") for p in orchestrator["ports"])


def test_the_dockerfile_sets_no_secret() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.strip().upper().startswith(("ENV", "ARG")):
            assert "TOKEN" not in line.upper() and "PASSWORD" not in line.upper(), line


@pytest.mark.parametrize(
    ("host", "admin", "refused"),
    [
        ("127.0.0.1", None, False),  # a developer's machine: a generated token is fine
        ("::1", None, False),
        ("localhost", None, False),
        ("0.0.0.0", None, True),
        ("0.0.0.0", "change-me", True),
        ("0.0.0.0", "short", True),
        ("10.1.2.3", "secret", True),
        ("0.0.0.0", "f3b1c0d2e4a5968778695a4b3c2d1e0f", False),
    ],
)
def test_listening_off_loopback_needs_a_strong_admin_token(
    host: str, admin: str | None, refused: bool
) -> None:
    settings = make_settings(SAGA_ADMIN_TOKEN=admin)
    refusals, _warnings = exposure(settings, host)
    assert bool(refusals) is refused, refusals


def test_an_open_api_off_loopback_is_loudly_warned_about() -> None:
    strong = "f3b1c0d2e4a5968778695a4b3c2d1e0f"
    _refusals, warnings = exposure(make_settings(SAGA_ADMIN_TOKEN=strong), "0.0.0.0")
    assert any("OPEN" in w for w in warnings), warnings
    with_token = make_settings(SAGA_ADMIN_TOKEN=strong, SAGA_API_TOKEN=strong[::-1])
    assert not any("OPEN" in w for w in exposure(with_token, "0.0.0.0")[1])
    assert not exposure(make_settings(), "127.0.0.1")[1]


def test_address_like_dns_patterns_are_warned_about() -> None:
    _refusals, warnings = exposure(make_settings(SAGA_ALLOWED_HOSTS="10.0.0.*"), "127.0.0.1")
    assert any("CIDR" in w for w in warnings), warnings


@pytest.mark.parametrize("admin", [None, "change-me"])
def test_serve_refuses_to_start_off_loopback(admin: str | None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    env.update(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none", SAGA_LOG_FORMAT="console")
    if admin:
        env["SAGA_ADMIN_TOKEN"] = admin
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SAGA_ADMIN_TOKEN" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
