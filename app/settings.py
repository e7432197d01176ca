"""Typed settings, read from the environment (and `.env`) when the process starts.

Nothing here runs at import time: `Settings()` is built by the CLI or by the test
fixtures and handed to `create_app` / the worker explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process configuration; see the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    data_dir: Path = Field(default=Path("./.saga"), alias="SAGA_DATA_DIR")
    api_token: str | None = Field(default=None, alias="SAGA_API_TOKEN")
    admin_token: str | None = Field(default=None, alias="SAGA_ADMIN_TOKEN")
    allowed_hosts: str = Field(default="*", alias="SAGA_ALLOWED_HOSTS")
    log_format: Literal["json", "console"] = Field(default="json", alias="SAGA_LOG_FORMAT")
    log_level: str = Field(default="INFO", alias="SAGA_LOG_LEVEL")

    # Executor tuning.
    worker_concurrency: int = Field(default=32, ge=1, le=1024, alias="SAGA_WORKER_CONCURRENCY")
    lease_seconds: float = Field(default=15.0, gt=0.5, le=3600, alias="SAGA_LEASE_SECONDS")
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60, alias="SAGA_POLL_INTERVAL")
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, alias="SAGA_SHUTDOWN_GRACE")
    idempotency_ttl_hours: float = Field(default=24.0, gt=0, alias="SAGA_IDEMPOTENCY_TTL_HOURS")
    db_pool_size: int = Field(default=10, ge=1, le=200, alias="SAGA_DB_POOL_SIZE")
    otlp_endpoint: str | None = Field(default=None, alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    # Test-only: the name of a point where the process kills itself (crash tests).
    failpoint: str | None = Field(default=None, alias="SAGA_FAILPOINT")

    @property
    def allowed_host_patterns(self) -> list[str]:
        return [p.strip().lower() for p in self.allowed_hosts.split(",") if p.strip()]


def sqlalchemy_url(url: str) -> str:
    """Map any accepted PostgreSQL URL form onto SQLAlchemy's psycopg 3 dialect."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must start with postgresql:// or postgresql+psycopg://")


def libpq_url(url: str) -> str:
    """The plain libpq form of a URL, for psycopg connections outside SQLAlchemy."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]
