"""Driving the dashboard with Debian's Chromium through Playwright: launch settings,
and where screenshots go."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.async_api import Page

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = "Chromium not found: install it with `apt-get install chromium` (the CI script does this)"

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"  # git-ignored
DOCS_SCREENSHOT = REPO / "docs" / "dashboard.png"
UPDATE_DOCS_ENV = "SAGA_UPDATE_DOCS_SCREENSHOT"


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def update_docs() -> bool:
    return os.environ.get(UPDATE_DOCS_ENV) == "1"


async def screenshot(page: Page, name: str, path: Path | None = None) -> Path:
    """A full-page screenshot into test-artifacts/dashboard/<name>.png (or `path`)."""
    target = path or ARTIFACTS / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(target), full_page=True)
    return target
