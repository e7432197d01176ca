"""The layout's size rule: no module of the product over 600 lines (the import rules are
checked by `lint-imports`, complexity by ruff's mccabe rule, both in the test command)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 600


def test_no_module_of_the_product_is_over_600_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for top in ("app", "examples")
        for path in (ROOT / top).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > LIMIT
    }
    assert not long, f"split these modules: {long}"
