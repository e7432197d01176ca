"""JSON (or console) log lines that carry the request id and any `extra` fields."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The request being served, for every log line it causes (set by the API's middleware).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}
REDACTED = "[redacted]"
_SECRET_KEYS = {"authorization", "token", "password", "headers"}


class Redactor:
    """Known secret values (tokens, service header values), replaced in every log line.

    The last line of defence: code already avoids logging request data and exception
    messages that may carry it; whatever still gets through is masked here, in each
    formatted line, also in its JSON-escaped spelling. Values shorter than MIN_LENGTH are
    not registered (they would mask ordinary words)."""

    MIN_LENGTH = 4

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._ordered: list[str] = []

    def add(self, *values: str | None) -> None:
        fresh = {v for v in values if v and len(v) >= self.MIN_LENGTH} - self._values
        if fresh:
            self._values |= fresh
            for value in fresh:
                escaped = json.dumps(value)[1:-1]
                self._values.add(escaped)
            # Longest first, so that a secret containing another is masked whole.
            self._ordered = sorted(self._values, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for value in self._ordered:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


known_secrets = Redactor()


def describe_error(exc: BaseException) -> str:
    """An error as logs may show it: its type, and a database error's SQLSTATE; never its
    message, which can carry SQL parameters, inputs or participants' answers."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(
        exc, "sqlstate", None
    )
    return f"{type(exc).__name__}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")


def safe_traceback(exc: BaseException, frames: int = 8) -> str:
    """Where an exception came from, without its message: messages of unexpected errors
    can carry request data (inputs, responses, header values), frames cannot."""
    summary = traceback.extract_tb(exc.__traceback__)
    own = [f for f in summary if "/app/" in f.filename.replace("\\", "/")]
    chosen = (own or summary)[-frames:]
    places = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in chosen]
    return " < ".join(reversed(places)) + f" ({type(exc).__name__})"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = REDACTED if key.lower() in _SECRET_KEYS else value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return known_secrets.redact(json.dumps(line, default=str))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = {
            k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
        }
        request_id = request_id_var.get()
        base = f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        if request_id:
            extras["request_id"] = request_id
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return known_secrets.redact(base)


def configure(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
