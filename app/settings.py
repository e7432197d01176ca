"""Typed settings, read from the environment (and `.env`) when the process starts.

Nothing here runs at import time: `Settings()` is built by the CLI or by the test
fixtures and handed to `create_app` / the worker explicitly.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.hosts import HostPolicy


class Settings(BaseSettings):
    """Process configuration; see the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    data_dir: Path = Field(default=Path("./.saga"), alias="SAGA_DATA_DIR")
    api_token: str | None = Field(default=None, alias="SAGA_API_TOKEN")
    admin_token: str | None = Field(default=None, alias="SAGA_ADMIN_TOKEN")
    metrics_token: str | None = Field(default=None, alias="SAGA_METRICS_TOKEN")
    public_url: str | None = Field(default=None, alias="SAGA_PUBLIC_URL")
    allowed_hosts: str = Field(default="*", alias="SAGA_ALLOWED_HOSTS")
    log_format: Literal["json", "console"] = Field(default="json", alias="SAGA_LOG_FORMAT")
    log_level: str = Field(default="INFO", alias="SAGA_LOG_LEVEL")

    # Executor tuning.
    worker_concurrency: int = Field(default=32, ge=1, le=1024, alias="SAGA_WORKER_CONCURRENCY")
    lease_seconds: float = Field(default=15.0, gt=0.5, le=3600, alias="SAGA_LEASE_SECONDS")
    poll_interval_seconds: float = Field(default=1.0, gt=0, le=60, alias="SAGA_POLL_INTERVAL")
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, alias="SAGA_SHUTDOWN_GRACE")
    idempotency_ttl_hours: float = Field(default=24.0, gt=0, alias="SAGA_IDEMPOTENCY_TTL_HOURS")
    # Finished sagas older than this are deleted by the workers (and `prune`); 0 or
    # empty keeps them forever.
    retention_hours: float | None = Field(default=720.0, ge=0, alias="SAGA_RETENTION_HOURS")
    db_pool_size: int = Field(default=10, ge=1, le=200, alias="SAGA_DB_POOL_SIZE")
    otlp_endpoint: str | None = Field(default=None, alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    # Test-only: the name of a point where the process kills itself (crash tests).
    failpoint: str | None = Field(default=None, alias="SAGA_FAILPOINT")

    @field_validator(
        "api_token", "admin_token", "metrics_token", "public_url", "retention_hours", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("SAGA_PUBLIC_URL must start with http:// or https://")
        return value.rstrip("/") if value else value

    @property
    def retention_seconds(self) -> float | None:
        """How long finished sagas are kept; None: forever."""
        return self.retention_hours * 3600 if self.retention_hours else None

    @property
    def callback_base(self) -> str:
        """The orchestrator's address as participants reach it (callback steps report
        there): SAGA_PUBLIC_URL, else the default local address."""
        return self.public_url or "http://127.0.0.1:8000"

    @property
    def https(self) -> bool:
        """Served to its users over https (SAGA_PUBLIC_URL says so): cookies are Secure."""
        return bool(self.public_url and self.public_url.startswith("https://"))

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: str) -> str:
        HostPolicy.parse(value)  # refuse to start on a pattern that cannot be read
        return value

    @property
    def host_policy(self) -> HostPolicy:
        return HostPolicy.parse(self.allowed_hosts)


def sqlalchemy_url(url: str) -> str:
    """Map any accepted PostgreSQL URL form onto SQLAlchemy's psycopg 3 dialect."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must start with postgresql:// or postgresql+psycopg://")


def libpq_url(url: str) -> str:
    """The plain libpq form of a URL, for psycopg connections outside SQLAlchemy."""
    return "postgresql://" + sqlalchemy_url(url)[len("postgresql+psycopg://") :]


WEAK_TOKENS = frozenset({"change-me", "changeme", "secret", "admin", "password", "token"})
MIN_TOKEN_LENGTH = 16


def loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def exposure(settings: Settings, host: str) -> tuple[list[str], list[str]]:
    """What is wrong with serving HTTP on `host` with these settings: (refusals, warnings).

    Off loopback, the admin token must be set and strong (a generated one would differ
    between replicas and be lost at restart), and an open /v1 is loudly warned about.
    """
    refusals: list[str] = []
    warnings: list[str] = []
    for name, value in (
        ("SAGA_API_TOKEN", settings.api_token),
        ("SAGA_METRICS_TOKEN", settings.metrics_token),
    ):
        if value is not None and _weak(value):
            refusals.append(f"{name} is too weak: use {MIN_TOKEN_LENGTH}+ random characters")
    if not loopback(host):
        token = settings.admin_token
        if not token:
            refusals.append(
                f"SAGA_ADMIN_TOKEN is not set, and {host} is not a loopback address: set it "
                f"to {MIN_TOKEN_LENGTH}+ random characters (the same on every replica)"
            )
        elif _weak(token):
            refusals.append(
                f"SAGA_ADMIN_TOKEN is too weak for {host}: use {MIN_TOKEN_LENGTH}+ random "
                "characters, not a placeholder"
            )
        if not settings.api_token:
            warnings.append(
                f"SAGA_API_TOKEN is not set: /v1 is OPEN to anyone who can reach {host}, "
                "registrations included; set SAGA_API_TOKEN"
            )
        if settings.host_policy.anything:
            warnings.append(
                "SAGA_ALLOWED_HOSTS is '*': participants may live on any host but the "
                "always-refused ranges; name your participants' hosts or networks"
            )
    for pattern in settings.host_policy.dns:
        if pattern.address_like:
            warnings.append(
                f"SAGA_ALLOWED_HOSTS entry {pattern.glob!r} looks like an address wildcard: "
                "it is a DNS pattern and matches nothing; write a CIDR block (10.0.0.0/24)"
            )
    return refusals, warnings


def _weak(token: str) -> bool:
    return token.strip().lower() in WEAK_TOKENS or len(token) < MIN_TOKEN_LENGTH
