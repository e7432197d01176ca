"""Callback reports from participants: `POST /v1/callbacks/{token}`."""

from __future__ import annotations

from app.core.callbacks import CallbackReport, token_hash
from app.core.views import Reported, ReportOutcome
from app.logs import known_secrets
from app.store.callbacks import CallbackStore
from app.usecases.errors import Problem

# A token as the executor makes them (URL-safe base64), with room to spare; anything else
# cannot be one and is not looked up.
MAX_TOKEN_LENGTH = 256


class Callbacks:
    def __init__(self, store: CallbackStore) -> None:
        self.store = store

    async def report(self, token: str, report: CallbackReport) -> Reported:
        """Take a report; the same one again is an idempotent success (the participant
        may resend after a lost answer); anything else after the first is a conflict."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise _unknown()
        stored = report.stored()
        if report.status == "succeeded":
            message = "reported succeeded"
        else:
            message = known_secrets.redact(f"reported failed: {report.error}")
        result = await self.store.report(token_hash(token), stored, message)
        if result.outcome is ReportOutcome.NOT_FOUND:
            raise _unknown()
        if result.outcome is ReportOutcome.DIFFERENT:
            raise Problem(
                409,
                "a different report was already taken for this attempt; a report cannot be changed",
                slug="report-conflict",
            )
        if result.outcome is ReportOutcome.CLOSED:
            raise Problem(
                409,
                "this attempt's wait is over (it timed out, or the saga moved on): a "
                "retried attempt carries a new callback URL",
                slug="callback-closed",
            )
        return result


def _unknown() -> Problem:
    return Problem(404, "no callback attempt has this token", slug="unknown-callback")
