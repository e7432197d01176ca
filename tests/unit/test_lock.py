"""constraints.txt pins what pyproject.toml allows, and tasks.py installs from it.

The lock is made by `python3 tasks.py lock` (pip-compile): every dependency of the
project and its dev extra is pinned there, at a version its range in pyproject.toml
allows; `ensure_venv` installs with `-c constraints.txt` and reinstalls when either file
changes (its stamp is a digest of both).
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if match := PIN.match(line):
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    ]


def _tasks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tasks_under_test", ROOT / "tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    checked = 0
    for requirement in _requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt: run python3 tasks.py lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement.specifier}: run python3 tasks.py lock"
        )
        checked += 1
    assert checked >= 20


def test_the_lock_says_how_to_refresh_it_and_names_no_local_index() -> None:
    text = LOCK.read_text()
    assert "python3 tasks.py lock" in text
    assert not re.search(r"^\s*(-e|--index-url|--extra-index-url|--find-links)", text, re.M)
    assert "file://" not in text and "/opt/" not in text


def test_the_install_uses_the_lock_and_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = _tasks()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    lock = tmp_path / "constraints.txt"
    lock.write_text("fastapi==1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("")
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tasks, "ROOT", tmp_path)
    monkeypatch.setattr(tasks, "LOCK", lock)
    monkeypatch.setattr(tasks, "BIN", bin_dir)
    monkeypatch.setattr(tasks, "STAMP", tmp_path / ".installed")
    monkeypatch.setattr(tasks, "_run", lambda *cmd, **_: calls.append(cmd) or 0)

    tasks.ensure_venv()
    install = [c for c in calls if "-e" in c]
    assert install and ("-c", lock) == install[0][install[0].index("-c") :][:2], calls
    calls.clear()
    tasks.ensure_venv()
    assert calls == [], "nothing changed: no reinstall"
    lock.write_text("fastapi==2\n")
    tasks.ensure_venv()
    assert any("-e" in c for c in calls), "the lock changed: reinstall"


def test_the_dockerfile_installs_with_the_lock() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in text
    assert re.search(r"pip install .*-c \S*constraints\.txt", text), text
