"""The wheel is the product: built from the checkout and installed elsewhere, it can
`migrate` and `serve` (the migrations ship inside it as `app.migrations`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.support.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_for_the_wheel() -> None:
    """The packages are listed in pyproject.toml (the migrations are mapped in): a new
    package that is not listed would be missing from the installed product."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("app", "examples")
        for path in (ROOT / top).rglob("__init__.py")
    }
    assert on_disk | {"app.migrations", "app.migrations.versions"} == listed


def test_a_built_wheel_installed_elsewhere_migrates_and_serves(db_url: str, tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    # The installed copy first; the project's dependencies come from this environment.
    env.update(
        PYTHONPATH=str(target), DATABASE_URL=db_url, SAGA_ADMIN_TOKEN="wheel-admin-token-0123"
    )
    where = subprocess.run(
        [sys.executable, "-c", "import app, app.migrations as m; print(app.__file__, m.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(target) in where and str(ROOT / "app") not in where, where

    migrated = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr

    port = free_port()
    serving = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=run_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert serving.poll() is None, serving.communicate()[0]
            assert time.monotonic() < deadline, "the installed service did not become ready"
            time.sleep(0.2)
        assert ready.json()["status"] == "ready"
        page = httpx.get(f"http://127.0.0.1:{port}/admin/login", timeout=5)
        assert page.status_code == 200 and "token" in page.text  # templates shipped too
    finally:
        os.killpg(serving.pid, signal.SIGTERM)
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
            serving.wait()
