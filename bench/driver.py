"""The load generator for systems behind HTTP, in its own process (its CPU is not counted).

    python bench/driver.py --kind saga --base http://127.0.0.1:P --token T
    python bench/driver.py --kind dbos --base http://127.0.0.1:P

Speaks bench/protocol.py on stdin/stdout. Each caller keeps one pooled
`httpx.AsyncClient` for its whole life and loops: start a saga (`POST /v1/sagas` with a
fresh `Idempotency-Key`, or DBOS's `POST /start` with the key as workflow id), then
long-poll it to its end (`GET /v1/sagas/{id}?wait_seconds=30` until completed,
compensated or failed; DBOS: `GET /result/{id}`).

Its own command `burst` starts `n` sagas at once (one shared client, a 503 retried after
its Retry-After with the same Idempotency-Key) and answers when all have ended: the
in-flight scenario (at most `seconds`; the sagas still going then are left).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol import RunOne, serve

TERMINAL = {"completed", "compensated", "failed"}


def _nothing() -> None:
    pass


WAIT_SECONDS = 30


class Driver:
    def __init__(self, kind: str, base: str, token: str | None) -> None:
        self.kind = kind
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retry_unavailable = False
        self.unavailable = 0
        self.transport_errors = 0

    def client(self, connections: int = 4) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            headers=self.headers,
            timeout=httpx.Timeout(WAIT_SECONDS + 30),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def one(
        self, client: httpx.AsyncClient, definition: str, on_started: Callable[[], None] = _nothing
    ) -> str:
        key = uuid.uuid4().hex
        if self.kind == "dbos":
            return await self._one_dbos(client, key, on_started)
        started = await self._send(
            client,
            "POST",
            "/v1/sagas",
            json={"definition": definition, "input": {"order": key}},
            headers={"Idempotency-Key": key},  # the same on a retry: still one saga
        )
        if started.status_code not in (200, 201):
            raise RuntimeError(f"POST /v1/sagas answered {started.status_code}: {started.text}")
        on_started()
        saga = started.json()
        while saga["status"] not in TERMINAL:
            polled = await self._send(
                client, "GET", f"/v1/sagas/{saga['id']}", params={"wait_seconds": WAIT_SECONDS}
            )
            if polled.status_code != 200:
                raise RuntimeError(f"GET saga answered {polled.status_code}: {polled.text}")
            saga = polled.json()
        return str(saga["status"])

    async def _send(
        self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        """One request; with `retry_unavailable`, a 503 is retried after its Retry-After
        (at most 1 s) and a connection error after 0.5 s, as a client of an overloaded
        service would (a saga's start keeps its Idempotency-Key)."""
        while True:
            try:
                response = await client.request(method, url, **kwargs)
            except httpx.TransportError:
                if not self.retry_unavailable:
                    raise
                self.transport_errors += 1
                await asyncio.sleep(0.5)
                continue
            if response.status_code != 503 or not self.retry_unavailable:
                return response
            self.unavailable += 1
            try:
                pause = min(1.0, float(response.headers.get("retry-after", "1")))
            except ValueError:
                pause = 1.0
            await asyncio.sleep(pause)

    async def _one_dbos(
        self, client: httpx.AsyncClient, key: str, on_started: Callable[[], None]
    ) -> str:
        started = await self._send(client, "POST", "/start", headers={"Idempotency-Key": key})
        if started.status_code != 200:
            raise RuntimeError(f"POST /start answered {started.status_code}: {started.text}")
        on_started()
        workflow_id = started.json()["id"]
        while True:
            polled = await self._send(client, "GET", f"/result/{workflow_id}")
            if polled.status_code != 200:
                raise RuntimeError(f"GET /result answered {polled.status_code}: {polled.text}")
            status = str(polled.json()["status"])
            if status != "pending":
                return status

    @contextlib.asynccontextmanager
    async def caller(self, options: Mapping[str, Any]) -> AsyncIterator[RunOne]:
        definition = str(options.get("definition", ""))
        async with self.client() as client:

            async def run_one() -> str:
                return await self.one(client, definition)

            yield run_one

    async def burst(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Start `n` sagas at once and wait for all of them, at most `seconds`."""
        n = int(message["n"])
        seconds = float(message.get("seconds", 600))
        definition = str(message.get("definition", ""))
        records: list[tuple[float, float, str]] = []
        errors: list[str] = []
        in_flight = 0
        most = 0
        self.retry_unavailable, self.unavailable, self.transport_errors = True, 0, 0

        def started() -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)

        async with self.client(connections=n + 16) as client:

            async def one() -> None:
                nonlocal in_flight
                begun = time.monotonic()
                try:
                    status = await self.one(client, definition, started)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    return
                in_flight -= 1
                records.append((begun, time.monotonic(), status))

            tasks = [asyncio.create_task(one()) for _ in range(n)]
            _, pending = await asyncio.wait(tasks, timeout=seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.retry_unavailable = False
        return {
            "records": records,
            "errors": len(errors),
            "error_samples": errors[:5],
            "max_started_not_finished": most,
            "answers_503": self.unavailable,
            "connection_errors": self.transport_errors,
            "unfinished": len(pending),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["saga", "dbos"], required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--token")
    args = parser.parse_args()
    driver = Driver(args.kind, args.base, args.token)
    await serve(driver.caller, {"burst": driver.burst})


if __name__ == "__main__":
    asyncio.run(main())
