"""A small typed client for the orchestrator's HTTP API.

Every write it sends is idempotent (PUT a service, POST a definition by content, POST
a saga with an Idempotency-Key), so it retries connection errors and 503s safely.
Participants of callback steps report with `report()` or a `CallbackReporter`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from app.core.callbacks import CALLBACK_URL_HEADER

__all__ = [
    "CALLBACK_URL_HEADER",
    "TERMINAL",
    "ApiError",
    "CallbackReporter",
    "SagaClient",
    "Started",
    "callback_due",
    "report",
    "report_body",
    "waiting_steps",
]

TERMINAL = frozenset({"completed", "compensated", "failed"})


class ApiError(Exception):
    """A 4xx/5xx answer: carries the problem document."""

    def __init__(self, status: int, problem: dict[str, Any], location: str | None = None) -> None:
        super().__init__(f"{status}: {problem.get('detail', problem)}")
        self.status = status
        self.problem = problem
        self.location = location  # e.g. the running saga of a 409 on an exclusive key


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ApiError) and exc.status in (502, 503, 504)


@dataclass(frozen=True, slots=True)
class Started:
    saga: dict[str, Any]
    replayed: bool


class _Http:
    """One pooled HTTP client with the retries every call here shares: connection errors
    and 502/503/504 are tried again for `retry_for` seconds; any other 4xx/5xx raises
    `ApiError` with the problem document."""

    def __init__(self, http: httpx.AsyncClient, retry_for_seconds: float) -> None:
        self._http = http
        self._retry_for = retry_for_seconds

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_random_exponential(multiplier=0.2, max=3),
            stop=stop_after_delay(self._retry_for),
            reraise=True,
        ):
            with attempt:
                response = await self._http.request(method, url, **kwargs)
                if response.status_code >= 400:
                    try:
                        problem = response.json()
                    except ValueError:
                        problem = {"detail": response.text}
                    raise ApiError(response.status_code, problem, response.headers.get("Location"))
                return response
        raise AssertionError("unreachable")  # pragma: no cover


class SagaClient(_Http):
    """Async client; use as `async with SagaClient(url, token) as client: ...`."""

    def __init__(
        self, base_url: str, token: str | None = None, retry_for_seconds: float = 30.0
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=40.0)
        super().__init__(http, retry_for_seconds)

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Any call, with the same retries; the answer's JSON body. Only for calls that
        are safe to repeat (reads, and writes that are idempotent by design)."""
        return (await self._request(method, path, **kwargs)).json()

    async def put_service(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        response = await self._request("PUT", f"/v1/services/{name}", json=spec)
        result: dict[str, Any] = response.json()
        return result

    async def register_definition(self, definition: dict[str, Any]) -> dict[str, Any]:
        response = await self._request("POST", "/v1/definitions", json=definition)
        result: dict[str, Any] = response.json()
        return result

    async def start_saga(
        self,
        definition: str,
        input: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
        business_key: str | None = None,
        labels: dict[str, str] | None = None,
        notify: dict[str, Any] | None = None,
    ) -> Started:
        """Start a saga. A key is generated when none is given, so a retry after a lost
        answer cannot start a second saga. On an exclusive definition, a business key
        held by an unfinished saga is an `ApiError` 409 whose `location` names that saga.
        `notify` (`{"url": …}` or `{"service": …, "path": …}`, optional `headers` and
        `retry`) replaces the definition's completion notification; the saga's
        `notification` (`{"status", "attempts"}` or None) says how it went."""
        key = idempotency_key or f"client-{uuid.uuid4()}"
        body: dict[str, Any] = {"definition": definition, "input": input or {}}
        if version is not None:
            body["version"] = version
        if business_key is not None:
            body["business_key"] = business_key
        if labels:
            body["labels"] = labels
        if notify is not None:
            body["notify"] = notify
        response = await self._request(
            "POST", "/v1/sagas", json=body, headers={"Idempotency-Key": key}
        )
        return Started(
            saga=response.json(),
            replayed=response.headers.get("Idempotent-Replayed") == "true",
        )

    async def get_saga(self, saga_id: str, wait_seconds: float = 0) -> dict[str, Any]:
        params = {"wait_seconds": wait_seconds} if wait_seconds else {}
        response = await self._request("GET", f"/v1/sagas/{saga_id}", params=params)
        result: dict[str, Any] = response.json()
        return result

    async def wait(self, saga_id: str, within: float = 60.0) -> dict[str, Any]:
        """Long-poll until the saga is terminal; TimeoutError after `within` seconds."""
        loop_deadline = time.monotonic() + within
        while True:
            remaining = loop_deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"saga {saga_id} is not terminal after {within}s")
            saga = await self.get_saga(saga_id, wait_seconds=min(30.0, max(remaining, 0.1)))
            if saga["status"] in TERMINAL:
                return saga

    async def list_sagas(
        self,
        *,
        status: str | None = None,
        definition: str | None = None,
        business_key: str | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page of sagas, newest first: `{"items": [...], "next_cursor": ...}`. Every
        filter given must match (each label pair too)."""
        params: list[tuple[str, str | int]] = [("limit", limit)]
        for name, value in (
            ("status", status),
            ("definition", definition),
            ("business_key", business_key),
            ("cursor", cursor),
        ):
            if value is not None:
                params.append((name, value))
        params += [("label", f"{k}:{v}") for k, v in (labels or {}).items()]
        response = await self._request("GET", "/v1/sagas", params=params)
        page: dict[str, Any] = response.json()
        return page

    async def events(self, saga_id: str) -> list[dict[str, Any]]:
        response = await self._request("GET", f"/v1/sagas/{saga_id}/events")
        items: list[dict[str, Any]] = response.json()["items"]
        return items


# --- callback steps: what a participant uses to report -----------------------------------


def callback_due(saga: dict[str, Any], step: str) -> datetime | None:
    """When the wait of `step` (a `waiting` callback step of `saga`, as `get_saga`
    answers it) ends without a report; None when that step is not waiting."""
    for s in saga.get("steps", []):
        if s.get("name") == step and s.get("status") == "waiting" and s.get("callback_due_at"):
            return datetime.fromisoformat(s["callback_due_at"])
    return None


def waiting_steps(saga: dict[str, Any]) -> list[str]:
    """The names of the saga's steps that wait for their callback report."""
    return [s["name"] for s in saga.get("steps", []) if s.get("status") == "waiting"]


def report_body(status: str, response: Any = None, error: str | None = None) -> dict[str, Any]:
    """The `POST /v1/callbacks/{token}` document: `succeeded` with a response (any JSON),
    or `failed` with an error text."""
    if status == "succeeded":
        if error is not None:
            raise ValueError("a succeeded report carries a response, not an error")
        return {"status": "succeeded", "response": response}
    if status == "failed":
        if not error:
            raise ValueError("a failed report needs an error: say what went wrong")
        if response is not None:
            raise ValueError("a failed report carries an error, not a response")
        return {"status": "failed", "error": error}
    raise ValueError(f"status is 'succeeded' or 'failed', not {status!r}")


class CallbackReporter(_Http):
    """Reports callback steps' outcomes, for participants: one pooled HTTP client for
    every report; use as `async with CallbackReporter() as reporter: ...`.

    A report needs no bearer token: the callback URL (from the action's
    `X-Saga-Callback-URL` header) is the credential, so never log it. The same report
    again is answered 200, so connection errors and 502/503/504 are retried for
    `retry_for_seconds` (an orchestrator restarting loses no report).
    """

    def __init__(self, retry_for_seconds: float = 30.0, timeout: float = 10.0) -> None:
        super().__init__(httpx.AsyncClient(timeout=timeout), retry_for_seconds)

    async def report(
        self,
        callback_url: str,
        status: str,
        response: Any = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Report to the full `callback_url`; the answer `{"saga_id", "step", "status"}`.

        `ApiError` 404: no attempt has this URL's token; 409: a different report was
        taken for the attempt, or its wait is over (timed out: the retry carries a new
        URL, report there; or the saga was cancelled or passed its deadline)."""
        body = report_body(status, response, error)
        answer = await self._request("POST", callback_url, json=body)
        result: dict[str, Any] = answer.json()
        return result


async def report(
    callback_url: str,
    status: str,
    response: Any = None,
    error: str | None = None,
    *,
    retry_for_seconds: float = 30.0,
) -> dict[str, Any]:
    """One report with a client of its own (see `CallbackReporter.report`; a participant
    that reports often keeps one `CallbackReporter` instead)."""
    async with CallbackReporter(retry_for_seconds) as reporter:
        return await reporter.report(callback_url, status, response, error)
