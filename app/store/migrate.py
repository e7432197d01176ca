"""Apply Alembic migrations from code (`migrate`, `serve`, test fixtures)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

# The top-level migrations/ folder, shipped in the package as `app.migrations` (see
# pyproject.toml): found the same way in a checkout and in an installed wheel.
MIGRATIONS = resources.files("app.migrations")


@contextlib.contextmanager
def _script_location() -> Iterator[str]:
    with resources.as_file(MIGRATIONS) as path:
        yield str(path)


def alembic_config(url: str, location: str) -> Config:
    config = Config()
    config.set_main_option("script_location", location)
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    with _script_location() as location:
        command.upgrade(alembic_config(url, location), revision)


def downgrade(url: str, revision: str = "base") -> None:
    with _script_location() as location:
        command.downgrade(alembic_config(url, location), revision)


@contextlib.contextmanager
def script_directory() -> Iterator[ScriptDirectory]:
    """The migrations as Alembic sees them (revisions, heads)."""
    with _script_location() as location:
        yield ScriptDirectory.from_config(alembic_config("postgresql://unused", location))


def head_revision() -> str | None:
    with script_directory() as script:
        return script.get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()
